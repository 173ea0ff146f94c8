"""MM-FM: the Gaussian-source baseline (N(0, I), independent coupling, unconditional).

Presets: demo (default), imagenet256_xl, imagenet256_s. Usage:
  python -m mmfm_jax.main --config=configs/gaussian.py[:PRESET] --workdir=DIR
"""

from configs.base import get_base_config


def get_config(preset=None):
    return get_base_config(source="gaussian", mode_conditional=False, preset=preset)
