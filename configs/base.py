"""The base every experiment file builds on (big_vision style: configs are code).

The schema itself (every key a run reads, its default, the presets) lives in the library,
`mmfm_jax/config_schema.py`, so that benchmarks and tests build run configs without
importing `configs/`; this file is what the experiment files import.
"""

from mmfm_jax.config_schema import MODEL_SIZES, PRESETS, get_base_config

__all__ = ["MODEL_SIZES", "PRESETS", "get_base_config"]
