"""Repeated layers as one stacked module run by `jax.lax.scan`, and remat policies.

An unrolled Python loop over 28 + 2 transformer blocks hands XLA 30 copies of the block
to compile; compile time grows with depth (minutes to an hour on TPU pods for
unscanned diffusion transformers). Stacking the blocks' variables along a leading
"layers" axis and scanning one block body over it compiles the block once.

* `stack_modules` turns N identically-shaped modules into one whose every variable has
  a leading axis of N (logical name `LAYERS_AXIS`, which the sharding rules leave
  replicated: `parallel.logical_to_spec` maps names it has no rule for to None). The
  modules are built first, one by one, so a stacked model starts from exactly the
  weights of its unrolled twin with the same seed.
* `scan_modules` runs `step(layer, carry)` over the stack with `jax.lax.scan` (the NNX
  functional API: `nnx.split` once, `nnx.merge` one layer's slice per step), optionally
  under `jax.checkpoint` with a remat policy.
* `remat_name` / `checkpoint_policy`: the remat option of a model config, "none",
  "full" or a `jax.checkpoint_policies` name; True / False mean "full" / "none".
* `LayerStack`, `stack_arrays`, `unstack_arrays`: the same regrouping on flat
  {"path/to/var": array} dicts (model directories, converters), between per-layer
  names ("blocks/3/attn/qkv/kernel") and stacked ones ("encoder_blocks/attn/qkv/kernel").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel

LAYERS_AXIS = "layers"  # logical name of the stacked axis; no rule: replicated
# jax.checkpoint_policies entries that are policies themselves (the others are factories
# that need names or offload targets).
_JAX_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                 "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
REMAT_POLICIES = ("none", "full") + _JAX_POLICIES


def remat_name(value: bool | str) -> str:
    """The remat option as one of REMAT_POLICIES: True -> "full", False -> "none", and the
    strings "true" / "false" (a command line) likewise."""
    if isinstance(value, (bool, np.bool_)):
        return "full" if value else "none"
    if isinstance(value, str):
        name = {"true": "full", "false": "none"}.get(value.strip().lower(), value.strip())
        if name in REMAT_POLICIES:
            return name
    raise ValueError(f"remat {value!r}: use True/False or one of {', '.join(REMAT_POLICIES)}")


def checkpoint_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a remat name ("full": None, save nothing)."""
    name = remat_name(name)
    if name == "none":
        raise ValueError("remat 'none' has no checkpoint policy")
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_variables(*variables: nnx.Variable) -> nnx.Variable:
    first = variables[0]
    value = jnp.stack([v[...] for v in variables])
    axes = first.get_metadata().get("out_sharding")
    if axes is None:
        return first.replace(value)
    return first.replace(value, out_sharding=(LAYERS_AXIS, *axes))


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose every variable stacks those of `modules` (same structure) along a
    new leading axis, annotated `LAYERS_AXIS`."""
    if not modules:
        raise ValueError("stack_modules: no modules to stack")
    graphdef, first = nnx.split(modules[0])
    states = [first]
    for i, module in enumerate(modules[1:], 1):
        other_def, state = nnx.split(module)
        if other_def != graphdef:
            raise ValueError(f"stack_modules: module {i} differs in structure from module 0")
        states.append(state)
    return nnx.merge(graphdef, jax.tree.map(_stack_variables, *states, is_leaf=_is_variable))


def num_layers(stack: nnx.Module) -> int:
    """The length of the stacked axis."""
    return int(jax.tree.leaves(nnx.state(stack))[0].shape[0])


def scan_modules(stack: nnx.Module, step: Callable[[nnx.Module, Any], Any], carry, *,
                 remat: bool | str = "none"):
    """`carry` through `step(layer, carry)` for every layer of `stack` in order, as one
    `jax.lax.scan` (the body traced and compiled once), rematerialised per layer by the
    `remat` policy. `step` must not modify the layer's variables."""
    graphdef, state = nnx.split(stack)

    def body(c, layer_state):
        return parallel.constrain_batch(step(nnx.merge(graphdef, layer_state), c)), None

    name = remat_name(remat)
    if name != "none":
        body = jax.checkpoint(body, policy=checkpoint_policy(name), prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry


# ----------------------------------------------------------------------------------------
# Flat {"path": array} dicts: per-layer names <-> stacked names.

@dataclasses.dataclass(frozen=True)
class LayerStack:
    """One stacked module in both layouts: its path and its layers' paths, in order."""

    stacked: str  # "encoder_blocks"
    layers: tuple[str, ...]  # ("blocks/0", "blocks/1", ...)


def _split_name(name: str, prefixes: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(prefixes[p], rest) for the prefix p with name == p + "/" + rest, else None."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        hit = prefixes.get("/".join(parts[:i]))
        if hit is not None:
            return hit, "/".join(parts[i:])
    return None


def is_stacked(names: Iterable[str], stacks: Sequence[LayerStack]) -> bool | None:
    """True when `names` use the stacked paths, False the per-layer ones, None neither."""
    stacked = {s.stacked: s for s in stacks}
    layers = {p: s for s in stacks for p in s.layers}
    per_layer = False
    for name in names:
        if _split_name(name, stacked) is not None:
            return True
        per_layer = per_layer or _split_name(name, layers) is not None
    return False if per_layer else None


def stack_arrays(arrays: Mapping[str, Any], stacks: Sequence[LayerStack],
                 combine: Callable[[list], Any] = np.stack) -> dict[str, Any]:
    """Per-layer names -> stacked names, `combine` (np.stack) joining each variable's
    layers in order; other names pass through. Raises ValueError (one line) for a variable
    that some layers of its stack lack."""
    layers = {p: (s, k) for s in stacks for k, p in enumerate(s.layers)}
    out: dict[str, Any] = {}
    groups: dict[str, list] = {}
    for name, value in arrays.items():
        hit = _split_name(name, layers)
        if hit is None:
            out[name] = value
            continue
        (stack, k), rest = hit
        groups.setdefault(f"{stack.stacked}/{rest}", [None] * len(stack.layers))[k] = value
    for name, values in groups.items():
        absent = [i for i, v in enumerate(values) if v is None]
        if absent:
            raise ValueError(f"{name}: cannot stack, layers {absent} of {len(values)} missing")
        out[name] = combine(values)
    return out


def unstack_arrays(arrays: Mapping[str, Any], stacks: Sequence[LayerStack],
                   split: Callable[[Any], Sequence] = lambda a: [a[i] for i in range(len(a))]
                   ) -> dict[str, Any]:
    """Stacked names -> per-layer names, `split` (indexing: views, no copies) giving each
    layer's slice; other names pass through. Raises ValueError (one line) when a stacked
    axis does not have the stack's number of layers."""
    stacked = {s.stacked: s for s in stacks}
    out: dict[str, Any] = {}
    for name, value in arrays.items():
        hit = _split_name(name, stacked)
        if hit is None:
            out[name] = value
            continue
        stack, rest = hit
        parts = split(value)
        if len(parts) != len(stack.layers):
            raise ValueError(f"{name}: stacked axis of {len(parts)}, expected "
                             f"{len(stack.layers)} layers")
        out.update({f"{prefix}/{rest}": part for prefix, part in zip(stack.layers, parts)})
    return out


def to_layout(arrays: Mapping[str, Any], stacks: Sequence[LayerStack], *, stacked: bool
              ) -> dict[str, Any]:
    """`arrays` in the stacked layout (`stacked`) or the per-layer one."""
    return stack_arrays(arrays, stacks) if stacked else unstack_arrays(arrays, stacks)


def stack_shapes(shapes: Mapping[str, tuple[int, ...]], stacks: Sequence[LayerStack]
                 ) -> dict[str, tuple[int, ...]]:
    """`stack_arrays` on {"name": shape}."""
    return stack_arrays(shapes, stacks, combine=lambda s: (len(s), *s[0]))


def unstack_shapes(shapes: Mapping[str, tuple[int, ...]], stacks: Sequence[LayerStack]
                   ) -> dict[str, tuple[int, ...]]:
    """`unstack_arrays` on {"name": shape}."""
    return unstack_arrays(shapes, stacks, split=lambda s: [tuple(s[1:])] * s[0])
