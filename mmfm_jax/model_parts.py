"""A run's DiTDH as training and the EMA restore hold it: config, parts, abstract state.

`model_config(cfg)` is the DiTDH of a run config. The trainer splits that model once with
`nnx.split` into a graph definition, the trainable `nnx.Param` state and the frozen tables
(pos-embed, Fourier W, RoPE) and carries the two states as pure dicts; `ModelParts` merges
them back into a model. `abstract_model_state` gives both states shape-only, each leaf
with its sharding on the mesh, so the trainer builds its state shardings from it and the
EMA restore (checkpoint.py) reads `{ema, frozen}` without building an optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from mmfm_jax.models import DiTDH, DiTDHConfig, state_shardings
from mmfm_jax.models.state_arrays import flat_variables


def model_config(cfg) -> DiTDHConfig:
    """The DiTDH of a run; mode-conditional runs feed the mode through the label table."""
    m = cfg.model
    return DiTDHConfig(input_size=int(m.input_size), in_channels=int(m.in_channels),
                       hidden_size=tuple(m.hidden_size), depth=tuple(m.depth),
                       num_heads=tuple(m.num_heads), mlp_ratio=float(m.mlp_ratio),
                       num_classes=int(m.num_classes),
                       class_dropout_prob=float(m.class_dropout_prob),
                       use_y_conditioning=bool(cfg.mode_conditional),
                       compute_dtype=str(m.compute_dtype), remat=m.remat,
                       scan_blocks=bool(m.get("scan_blocks", False)),
                       attention_impl=m.attention_impl or None)


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The split DiTDH: graph definition and the tree structures of its two states."""

    graphdef: Any
    params_def: Any
    frozen_def: Any

    def merge(self, params, frozen) -> DiTDH:
        p = jax.tree.unflatten(self.params_def, jax.tree.leaves(params))
        f = jax.tree.unflatten(self.frozen_def, jax.tree.leaves(frozen))
        return nnx.merge(self.graphdef, p, f)


def split(model_or_state):
    """(graphdef or None, Param state, frozen state) of a model or of its state."""
    if isinstance(model_or_state, nnx.Module):
        graphdef, params, frozen = nnx.split(model_or_state, nnx.Param, ...)
    else:
        graphdef = None
        params, frozen = nnx.split_state(model_or_state, nnx.Param, ...)
    return graphdef, params, frozen


def pure(state):
    """An nnx.State as the pure dict the train state carries."""
    return nnx.to_pure_dict(state)


def abstract_model_state(mcfg: DiTDHConfig, mesh) -> tuple[ModelParts, dict, dict]:
    """ModelParts and the (params, frozen) pure dicts of ShapeDtypeStructs, each carrying
    its NamedSharding (logical axes through the active `parallel.axis_rules`)."""
    abstract = nnx.eval_shape(lambda: DiTDH(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = split(abstract)
    for state in (params, frozen):  # ModelParts.merge pairs leaves by flattening order
        if list(flat_variables(state)) != list(flat_variables(pure(state))):
            raise AssertionError("nnx.State and its pure dict flatten in different orders")
    parts = ModelParts(graphdef, jax.tree.structure(params), jax.tree.structure(frozen))
    _, p_sh, f_sh = split(state_shardings(abstract, mesh))

    def with_sharding(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            pure(shapes), pure(shardings))
    return parts, with_sharding(params, p_sh), with_sharding(frozen, f_sh)
