"""Flax NNX networks of MM-FM and their on-disk format.

The DiTDH flow model (`ditdh`, exported here), the RAE's DINOv2-family encoder and ViT
decoder (`dinov2`, `rae_decoder`; assembled by `mmfm_jax.rae`) and the FID Inception
(`inception`), built from shared blocks (`layers`). Every network is saved as one kind of
model directory (`model_dir`), filled into an abstract module by `state_arrays` and checked
by the one strict key check (`strict_keys`). `scan` stacks repeated layers for
`jax.lax.scan` (DiTDH's `scan_blocks`) and names the remat policies.
"""

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
