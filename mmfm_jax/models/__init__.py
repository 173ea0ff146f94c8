"""Flax NNX models of MM-FM: the DiTDH flow model."""

from mmfm_jax.models.ditdh import (
    DiTDH,
    DiTDHConfig,
    export_torch_state_dict,
    load_ditdh,
    save_ditdh,
    shard_model,
    state_shardings,
)

__all__ = ["DiTDH", "DiTDHConfig", "export_torch_state_dict", "load_ditdh", "save_ditdh",
           "shard_model", "state_shardings"]
