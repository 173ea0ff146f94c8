"""MM-FM: GMM source, mode coupling, unconditional DiTDH ("GMM").

Presets: demo (default), imagenet256_xl, imagenet256_s. Usage:
  python -m mmfm_jax.main --config=configs/uncond_gmm.py[:PRESET] --workdir=DIR
"""

from configs.base import get_base_config


def get_config(preset=None):
    return get_base_config(source="gmm", mode_conditional=False, preset=preset)
