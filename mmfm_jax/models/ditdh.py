"""DiTDH ("DiT with DDT head", RAE's `DiTwDDTHead`) in Flax NNX, channels-last.

An encoder stream (width D_e, sin-cos pos-embed, global adaLN conditioning) produces a
per-token condition s for a wide head stream (width D_h) that re-embeds the same noisy
input; see REFERENCE.md (c). Also here: the upstream key map (one table, used both by the
converter and by `export_torch_state_dict`), the on-disk format (safetensors + config.json)
and the sharding of the parameters over a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.models.layers import (
    Attention,
    Buffer,
    Frozen,
    LabelEmbedder,
    Linear,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
    swiglu_hidden,
)
from mmfm_jax.models.state_arrays import flat_variables, merge_from_arrays, variable_sharding

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NUM_FREQS = 256  # Gaussian-Fourier features of t

# DiTDH sizes (REFERENCE.md c.5): (encoder, head) widths, depths and heads; the head is
# shared by every size.
MODEL_SIZES = {
    "S": dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16)),
    "B": dict(hidden_size=(768, 2048), depth=(12, 2), num_heads=(12, 16)),
    "L": dict(hidden_size=(1024, 2048), depth=(24, 2), num_heads=(16, 16)),
    "XL": dict(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)),
}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected [encoder, head] pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


@dataclasses.dataclass(frozen=True)
class DiTDHConfig:
    """Architecture (RAE's `stage_2.params`) plus run-time options (dtype, remat, attention).

    Pairs are (encoder, head). class_dropout_prob > 0 means the label table has a null row
    at index num_classes.
    """

    input_size: int
    in_channels: int
    hidden_size: tuple[int, int]
    depth: tuple[int, int]
    num_heads: tuple[int, int]
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    use_y_conditioning: bool = True
    compute_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        for name in ("hidden_size", "depth", "num_heads"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        for width, heads, stream in zip(self.hidden_size, self.num_heads, ("encoder", "head")):
            if width % heads or (width // heads) % 4:
                raise ValueError(f"DiTDH {stream}: width {width} / {heads} heads must give a "
                                 "head dim divisible by 4 (2-D RoPE)")
        if self.hidden_size[0] % 4:
            raise ValueError(f"DiTDH encoder width {self.hidden_size[0]} must be divisible by 4 "
                             "(2-D sin-cos pos-embed)")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype {self.compute_dtype!r}: use float32 or bfloat16")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl {self.attention_impl!r}: use None, xla or cudnn")
        if self.attention_impl == "cudnn" and self.compute_dtype != "bfloat16":
            raise ValueError("attention_impl 'cudnn' needs compute_dtype 'bfloat16' (cuDNN "
                             "flash attention has no float32 kernel)")

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_label_rows(self) -> int:
        return self.num_classes + int(self.class_dropout_prob > 0)

    @property
    def num_tokens(self) -> int:
        return self.input_size * self.input_size

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @classmethod
    def from_upstream_params(cls, params: Mapping[str, Any], **overrides) -> DiTDHConfig:
        """From RAE's `stage_2.params`; refuses the options this port does not implement."""
        p = dict(params)
        if _pair(p.get("patch_size", 1)) != (1, 1):
            raise ValueError(f"DiTDH params: patch_size={p['patch_size']!r} is not supported "
                             "(this port implements patch_size=1)")
        for key, want in (("use_qknorm", False), ("use_swiglu", True), ("use_rope", True),
                          ("use_rmsnorm", True), ("wo_shift", False)):
            if bool(p.get(key, want)) != want:
                raise ValueError(f"DiTDH params: {key}={p[key]!r} is not supported "
                                 f"(this port implements {key}={want})")
        missing = [k for k in ("input_size", "in_channels", "hidden_size", "depth",
                               "num_heads", "num_classes") if k not in p]
        if missing:
            raise ValueError(f"DiTDH params: missing {', '.join(missing)}")
        kwargs = dict(input_size=int(p["input_size"]), in_channels=int(p["in_channels"]),
                      hidden_size=p["hidden_size"], depth=p["depth"], num_heads=p["num_heads"],
                      mlp_ratio=float(p.get("mlp_ratio", 4.0)),
                      num_classes=int(p["num_classes"]),
                      class_dropout_prob=float(p.get("class_dropout_prob", 0.1)),
                      use_y_conditioning=bool(p.get("use_y_conditioning", True)))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("hidden_size", "depth", "num_heads"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiTDHConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DiTDH config: unknown keys {unknown}")
        return cls(**d)

    def flops_per_sample(self) -> int:
        """Analytic forward FLOPs per sample: 2 x multiply-adds of every matmul, attention
        included (softmax, norms and elementwise work are not counted)."""
        (de, dh), (le, lh), n, c = self.hidden_size, self.depth, self.num_tokens, self.in_channels

        def block(d, cond_tokens):
            f = swiglu_hidden(d, self.mlp_ratio)
            return (cond_tokens * d * 6 * d + n * d * 3 * d + 2 * n * n * d + n * d * d
                    + n * d * 2 * f + n * f * d)

        macs = n * c * de + n * c * dh + 2 * NUM_FREQS * de + de * de
        macs += n * de * dh if de != dh else 0
        macs += le * block(de, 1) + lh * block(dh, n)
        macs += n * dh * 2 * dh + n * dh * c
        return 2 * macs


def sincos_pos_embed(dim: int, size: int) -> np.ndarray:
    """(1, S*S, dim) MAE 2-D sin-cos table, [col sin | col cos | row sin | row cos], float64
    math stored as float32 (only for fresh models: converted ones load theirs)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    i, j = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                       indexing="ij")
    col, row = np.outer(j.reshape(-1), omega), np.outer(i.reshape(-1), omega)
    table = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)
    return table[None].astype(np.float32)


def rope_tables(head_dim: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, hd) cos/sin tables of the EVA 2-D RoPE: first half row, second half column,
    interleaved pairs, float32."""
    half = head_dim // 2
    freqs = (1.0 / 10000 ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half))
    pos = (np.arange(size, dtype=np.float32) / size * size).astype(np.float32)
    per_axis = np.repeat(pos[:, None] * freqs[None, :].astype(np.float32), 2, axis=1)
    rows = np.repeat(per_axis, size, axis=0)  # token n = i*S + j -> row i
    cols = np.tile(per_axis, (size, 1))  # -> column j
    theta = np.concatenate([rows, cols], axis=1).astype(np.float32)
    return np.cos(theta), np.sin(theta)


class DDTBlock(nnx.Module):
    """RAE's `LightningDDTBlock`: adaLN(shift, scale, gate) x {attention, SwiGLU}."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
                 dtype, attention_impl: str | None):
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype,
                              implementation=attention_impl)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio, rngs=rngs, dtype=dtype)
        self.adaLN_modulation = Linear(dim, 6 * dim, axes=("embed", "mlp"), rngs=rngs,
                                       init="zeros", dtype=dtype)

    def __call__(self, h: jax.Array, cond: jax.Array, cos: jax.Array, sin: jax.Array):
        mods = jnp.split(self.adaLN_modulation(jax.nn.silu(cond)), 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = h + gate_msa * self.attn(modulate(self.norm1(h), shift_msa, scale_msa), cos, sin)
        return h + gate_mlp * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class FinalLayer(nnx.Module):
    """RMSNorm modulated by per-token (shift, scale) from s, then Linear to C (no gate)."""

    def __init__(self, dim: int, out_channels: int, *, rngs: nnx.Rngs, dtype):
        self.norm_final = RMSNorm(dim)
        self.adaLN_modulation = Linear(dim, 2 * dim, axes=("embed", "mlp"), rngs=rngs,
                                       init="zeros", dtype=dtype)
        self.linear = Linear(dim, out_channels, axes=("embed", "channels"), rngs=rngs,
                             init="zeros", dtype=dtype)

    def __call__(self, h: jax.Array, s: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(s)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class RoPE(nnx.Module):
    """Holder of one stream's (N, hd) cos/sin tables (loaded with the checkpoint)."""

    def __init__(self, head_dim: int, size: int):
        cos, sin = rope_tables(head_dim, size)
        self.freqs_cos = Buffer(jnp.asarray(cos))
        self.freqs_sin = Buffer(jnp.asarray(sin))


class DiTDH(nnx.Module):
    """`model(x, t, y)`: x (B, S, S, C) channels-last, t (B,) shifted time, y (B,) int labels
    -> velocity (B, S, S, C) float32. Deterministic: labels are dropped outside the model."""

    def __init__(self, config: DiTDHConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, dt = config, config.dtype
        (de, dh), (le, lh), (he, hh) = cfg.hidden_size, cfg.depth, cfg.num_heads
        c = cfg.in_channels
        self.pos_embed = Frozen(jnp.asarray(sincos_pos_embed(de, cfg.input_size)))
        self.x_embedder = Linear(c, dh, axes=("channels", "embed"), rngs=rngs, init="xavier",
                                 dtype=dt)
        self.s_embedder = Linear(c, de, axes=("channels", "embed"), rngs=rngs, init="xavier",
                                 dtype=dt)
        self.s_projector = (Linear(de, dh, axes=("embed", "mlp"), rngs=rngs, dtype=dt)
                            if de != dh else None)
        self.t_embedder = TimestepEmbedder(de, rngs=rngs, num_freqs=NUM_FREQS, dtype=dt)
        self.y_embedder = LabelEmbedder(cfg.num_label_rows, de, rngs=rngs, dtype=dt)
        self.final_layer = FinalLayer(dh, c, rngs=rngs, dtype=dt)
        self.enc_feat_rope = RoPE(de // he, cfg.input_size)
        self.dec_feat_rope = RoPE(dh // hh, cfg.input_size)
        self.blocks = nnx.List(
            [DDTBlock(de, he, cfg.mlp_ratio, rngs=rngs, dtype=dt,
                      attention_impl=cfg.attention_impl) for _ in range(le)]
            + [DDTBlock(dh, hh, cfg.mlp_ratio, rngs=rngs, dtype=dt,
                        attention_impl=cfg.attention_impl) for _ in range(lh)])

    @property
    def null_label(self) -> int:
        return self.config.null_label

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cfg = self.config
        b, hgt, wdt, c = x.shape
        if (hgt, wdt, c) != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(f"DiTDH expects x of shape (B, {cfg.input_size}, "
                             f"{cfg.input_size}, {cfg.in_channels}), got {x.shape}")
        dt = cfg.dtype
        tok = x.reshape(b, hgt * wdt, c).astype(dt)  # token n = i*S + j
        temb = self.t_embedder(t)
        cond = temb + self.y_embedder(y) if cfg.use_y_conditioning else temb
        cond = jax.nn.silu(cond)[:, None, :]

        le = cfg.depth[0]
        run = _remat_block if cfg.remat else _block
        s = self.s_embedder(tok) + self.pos_embed[...].astype(dt)
        enc_cos, enc_sin = self.enc_feat_rope.freqs_cos[...], self.enc_feat_rope.freqs_sin[...]
        for block in self.blocks[:le]:
            s = run(block, s, cond, enc_cos, enc_sin)
        s = jax.nn.silu(temb[:, None, :] + s)
        if self.s_projector is not None:
            s = self.s_projector(s)

        h = self.x_embedder(tok)
        dec_cos, dec_sin = self.dec_feat_rope.freqs_cos[...], self.dec_feat_rope.freqs_sin[...]
        for block in self.blocks[le:]:
            h = run(block, h, s, dec_cos, dec_sin)
        out = self.final_layer(h, s)
        return out.astype(jnp.float32).reshape(b, hgt, wdt, c)


def _block(block, h, cond, cos, sin):
    return block(h, cond, cos, sin)


_remat_block = nnx.remat(_block)


# ----------------------------------------------------------------------------------------
# Upstream key map: one table drives conversion (torch -> flax) and export (flax -> torch).

COPY, LINEAR, CONV1X1 = "copy", "linear", "conv1x1"


@dataclasses.dataclass(frozen=True)
class KeySpec:
    torch_key: str
    path: str  # "/"-joined path in nnx.state(model)
    kind: str  # COPY, LINEAR (W^T) or CONV1X1 (W[:, :, 0, 0]^T)
    torch_shape: tuple[int, ...]


def _linear_keys(torch_prefix: str, path: str, din: int, dout: int) -> list[KeySpec]:
    return [KeySpec(f"{torch_prefix}.weight", f"{path}/kernel", LINEAR, (dout, din)),
            KeySpec(f"{torch_prefix}.bias", f"{path}/bias", COPY, (dout,))]


def torch_key_map(cfg: DiTDHConfig) -> list[KeySpec]:
    """Every upstream state-dict key in upstream order, with its port path and shape."""
    (de, dh), (le, lh), (he, hh) = cfg.hidden_size, cfg.depth, cfg.num_heads
    c, n = cfg.in_channels, cfg.num_tokens
    specs = [KeySpec("pos_embed", "pos_embed", COPY, (1, n, de))]
    for name, d in (("x_embedder", dh), ("s_embedder", de)):
        specs += [KeySpec(f"{name}.proj.weight", f"{name}/kernel", CONV1X1, (d, c, 1, 1)),
                  KeySpec(f"{name}.proj.bias", f"{name}/bias", COPY, (d,))]
    if de != dh:
        specs += _linear_keys("s_projector", "s_projector", de, dh)
    specs.append(KeySpec("t_embedder.W", "t_embedder/W", COPY, (NUM_FREQS,)))
    specs += _linear_keys("t_embedder.mlp.0", "t_embedder/mlp0", 2 * NUM_FREQS, de)
    specs += _linear_keys("t_embedder.mlp.2", "t_embedder/mlp2", de, de)
    specs.append(KeySpec("y_embedder.embedding_table.weight", "y_embedder/embedding_table",
                         COPY, (cfg.num_label_rows, de)))
    specs.append(KeySpec("final_layer.norm_final.weight", "final_layer/norm_final/scale",
                         COPY, (dh,)))
    specs += _linear_keys("final_layer.linear", "final_layer/linear", dh, c)
    specs += _linear_keys("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation",
                          dh, 2 * dh)
    for name, d, h in (("enc_feat_rope", de, he), ("dec_feat_rope", dh, hh)):
        for table in ("freqs_cos", "freqs_sin"):
            specs.append(KeySpec(f"{name}.{table}", f"{name}/{table}", COPY, (n, d // h)))
    for i in range(le + lh):
        d = de if i < le else dh
        f = swiglu_hidden(d, cfg.mlp_ratio)
        tp, pp = f"blocks.{i}", f"blocks/{i}"
        specs += [KeySpec(f"{tp}.norm1.weight", f"{pp}/norm1/scale", COPY, (d,)),
                  KeySpec(f"{tp}.norm2.weight", f"{pp}/norm2/scale", COPY, (d,))]
        specs += _linear_keys(f"{tp}.attn.qkv", f"{pp}/attn/qkv", d, 3 * d)
        specs += _linear_keys(f"{tp}.attn.proj", f"{pp}/attn/proj", d, d)
        specs += _linear_keys(f"{tp}.mlp.w12", f"{pp}/mlp/w12", d, 2 * f)
        specs += _linear_keys(f"{tp}.mlp.w3", f"{pp}/mlp/w3", f, d)
        specs += _linear_keys(f"{tp}.adaLN_modulation.1", f"{pp}/adaLN_modulation", d, 6 * d)
    return specs


def from_torch_layout(kind: str, value: np.ndarray) -> np.ndarray:
    """Upstream array -> port array (a view: no copy, so shape-only inputs stay free)."""
    if kind == LINEAR:
        return value.T
    if kind == CONV1X1:
        return value[:, :, 0, 0].T
    return value


def to_torch_layout(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == LINEAR:
        return np.ascontiguousarray(value.T)
    if kind == CONV1X1:
        return np.ascontiguousarray(value.T[:, :, None, None])
    return np.ascontiguousarray(value)


# ----------------------------------------------------------------------------------------
# State as flat {"path/to/param": array}, sharding, save / load.

def flat_state(model_or_state) -> dict[str, nnx.Variable]:
    """{"path/to/var": Variable} for every variable (Param, Frozen, Buffer) of the model."""
    state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    return flat_variables(state)


def abstract_model(config: DiTDHConfig) -> DiTDH:
    """The model with shape-only variables (no memory, no compute)."""
    return nnx.eval_shape(lambda: DiTDH(config, rngs=nnx.Rngs(0)))


def count_params(model: DiTDH) -> int:
    """Trainable parameters (nnx.Param only; pos_embed, W and RoPE tables excluded)."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def state_shardings(model_or_state, mesh):
    """The NamedSharding tree matching `nnx.state(model)` (or the given state)."""
    state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: DiTDH, mesh) -> DiTDH:
    """Place every variable of `model` on `mesh` (in place) and return it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def model_from_arrays(config: DiTDHConfig, arrays: Mapping[str, np.ndarray], *, source: str,
                      mesh=None) -> DiTDH:
    """Build a DiTDH whose every variable comes from `arrays` ({"path": array}), strictly:
    missing, unexpected or mis-shaped entries raise one error naming them."""
    abstract = abstract_model(config)
    graphdef, state = nnx.split(abstract)
    variables = flat_state(state)
    missing = [k for k in variables if k not in arrays]
    unexpected = [k for k in arrays if k not in variables]
    misshaped = [f"{k}: shape {tuple(arrays[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in variables.items() if k in arrays
                 and tuple(arrays[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        raise ValueError(f"{source}: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {misshaped}")
    return merge_from_arrays(graphdef, state, arrays, mesh)


def _host_arrays(model: DiTDH) -> dict[str, np.ndarray]:
    vars_ = flat_state(model)
    host = parallel.global_to_host({k: v[...] for k, v in vars_.items()}, gather=True)
    return {k: np.asarray(v, np.float32) for k, v in host.items()}


def save_arrays(config: DiTDHConfig, arrays: Mapping[str, np.ndarray], out_dir: str) -> None:
    """Write {"path": array} + config.json as a model directory, atomically."""
    from safetensors.numpy import save_file

    from convert.common import atomic_directory  # torch-free; only imports numpy & stdlib

    with atomic_directory(out_dir) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()},
                  os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def save_ditdh(model: DiTDH, out_dir: str) -> None:
    """Write the model (weights gathered to the host) in the format `load_ditdh` reads."""
    if jax.process_index() == 0:
        save_arrays(model.config, _host_arrays(model), out_dir)
    else:  # still take part in the gather
        _host_arrays(model)


def load_config(model_dir: str) -> DiTDHConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no DiTDH config.json (convert a checkpoint with "
                                "`python -m convert ditdh`)")
    with open(path) as f:
        return DiTDHConfig.from_dict(json.load(f))


def load_ditdh(model_dir: str, *, mesh=None, compute_dtype: str | None = None) -> DiTDH:
    """Load a converted directory; shards the variables over `mesh` when one is given."""
    from safetensors.numpy import load_file

    config = load_config(model_dir)
    if compute_dtype is not None:
        config = dataclasses.replace(config, compute_dtype=compute_dtype)
    path = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing DiTDH weights")
    return model_from_arrays(config, load_file(path), source=path, mesh=mesh)


def export_torch_state_dict(model: DiTDH) -> dict[str, np.ndarray]:
    """Upstream `DiTwDDTHead.state_dict()` (names, order, NCHW/(out, in) layouts) as numpy."""
    arrays = _host_arrays(model)
    return {s.torch_key: to_torch_layout(s.kind, arrays[s.path])
            for s in torch_key_map(model.config)}
