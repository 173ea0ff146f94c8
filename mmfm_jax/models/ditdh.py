"""DiTDH ("DiT with DDT head", RAE's `DiTwDDTHead`) in Flax NNX, channels-last.

An encoder stream (width D_e, sin-cos pos-embed, global adaLN conditioning) produces a
per-token condition s for a wide head stream (width D_h) that re-embeds the same noisy
input; see REFERENCE.md (c). Also here: the model sizes, the upstream key map (one table,
used both by the converter and by `export_torch_state_dict`), saving and loading model
directories (the common format of `model_dir`, "mmfm_jax.ditdh") and the sharding of the
parameters over a mesh.

Two layouts of the blocks, one model: unrolled (`blocks/{i}/...`, a Python loop, upstream's
`blocks.{i}`) or, with `DiTDHConfig.scan_blocks`, each stream's blocks stacked along a
leading "layers" axis (`encoder_blocks/...`, `head_blocks/...`) and run by one
`jax.lax.scan` (`scan.py`), so XLA compiles one block per stream instead of 28 + 2. The
same seed gives the same weights in both; the key map, the converter, the export and the
directory loader translate between them (`block_stacks`, `arrays_in_layout`), so a
directory of either layout loads into either model. `remat` ("none", "full" or a
`jax.checkpoint_policies` name) rematerialises every block in both layouts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.models import model_dir as directory
from mmfm_jax.models import scan
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
from mmfm_jax.models.state_arrays import flat_variables, module_from_arrays, variable_sharding
from mmfm_jax.models.strict_keys import check_keys

FORMAT = "mmfm_jax.ditdh"
MODEL_DIR = directory.Format(
    FORMAT, convert_hint="convert a checkpoint with `python -m convert ditdh`",
    legacy=(directory.Layout(None, "model.safetensors"),))  # before format names
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


# compute_dtype -> (matmul/attention operand dtype, residual-stream dtype). "bfloat16" is
# upstream's torch autocast: bfloat16 operands with float32 accumulation, float32 streams,
# norms, RoPE, softmax, embeddings and modulation. "bfloat16_all" also casts the streams.
COMPUTE_DTYPES = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "float32"),
                  "bfloat16_all": ("bfloat16", "bfloat16")}


@dataclasses.dataclass(frozen=True)
class DiTDHConfig:
    """Architecture (RAE's `stage_2.params`) plus run-time options (dtype, remat, attention).

    Pairs are (encoder, head). class_dropout_prob > 0 means the label table has a null row
    at index num_classes. `compute_dtype` is a precision policy of `COMPUTE_DTYPES`.
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
    remat: bool | str = False  # True/"full", False/"none" or a jax.checkpoint_policies name
    attention_impl: str | None = None
    scan_blocks: bool = False  # each stream's blocks as one stacked module under lax.scan

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
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r}: use one of "
                             f"{', '.join(COMPUTE_DTYPES)}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl {self.attention_impl!r}: use None, xla or cudnn")
        if self.attention_impl == "cudnn" and self.dtype != jnp.bfloat16:
            raise ValueError("attention_impl 'cudnn' needs compute_dtype 'bfloat16' (cuDNN "
                             "flash attention has no float32 kernel)")
        scan.remat_name(self.remat)  # raises for an unknown policy
        if self.scan_blocks and min(self.depth) < 1:
            raise ValueError(f"DiTDH scan_blocks needs at least one block per stream, got "
                             f"depth {self.depth}")

    @property
    def remat_policy(self) -> str:
        """`remat` as one of `scan.REMAT_POLICIES` ("none", "full", "dots_saveable", ...)."""
        return scan.remat_name(self.remat)

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
        """The dtype of matmul and attention operands, and of what a `Linear` returns."""
        return jnp.dtype(COMPUTE_DTYPES[self.compute_dtype][0])

    @property
    def stream_dtype(self):
        """The dtype of the residual streams, norms, RoPE, modulation and embeddings."""
        return jnp.dtype(COMPUTE_DTYPES[self.compute_dtype][1])

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
        self.attn = Attention(dim, num_heads, keys=rngs.params, fused_qkv=True, dtype=dtype,
                              implementation=attention_impl)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio, rngs=rngs, dtype=dtype)
        self.adaLN_modulation = Linear(dim, 6 * dim, axes=("embed", "mlp"), keys=rngs.params,
                                       init="zeros", dtype=dtype)

    def __call__(self, h: jax.Array, cond: jax.Array, cos: jax.Array, sin: jax.Array):
        """h (B, N, D) in the stream dtype, returned in it: the Linears return it (their
        products rounded once to the operand dtype), the norms, modulation, RoPE and gated
        residual adds run in it. A per-sample condition (B, 1, D), the encoder's, gets its
        modulation unrounded: one token's matmul costs nothing and its rounding would
        repeat over every token."""
        stream = h.dtype
        mods = self.adaLN_modulation(jax.nn.silu(cond.astype(stream)), out_dtype=stream,
                                     accumulator=cond.shape[1] == 1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, -1)
        h = h + gate_msa * self.attn(modulate(self.norm1(h), shift_msa, scale_msa), (cos, sin))
        return h + gate_mlp * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class FinalLayer(nnx.Module):
    """RMSNorm modulated by per-token (shift, scale) from s, then Linear to C (no gate)."""

    def __init__(self, dim: int, out_channels: int, *, rngs: nnx.Rngs, dtype):
        self.norm_final = RMSNorm(dim)
        self.adaLN_modulation = Linear(dim, 2 * dim, axes=("embed", "mlp"), keys=rngs.params,
                                       init="zeros", dtype=dtype)
        self.linear = Linear(dim, out_channels, axes=("embed", "channels"), keys=rngs.params,
                             init="zeros", dtype=dtype)

    def __call__(self, h: jax.Array, s: jax.Array) -> jax.Array:
        """The velocity in h's (stream) dtype: the last Linear's float32 accumulator, not
        rounded to the operand dtype (autocast's would be: bfloat16)."""
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(s.astype(h.dtype)),
                                                       out_dtype=h.dtype), 2, axis=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale), out_dtype=h.dtype,
                           accumulator=True)


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
        self.x_embedder = Linear(c, dh, axes=("channels", "embed"), keys=rngs.params,
                                 init="xavier", dtype=dt)
        self.s_embedder = Linear(c, de, axes=("channels", "embed"), keys=rngs.params,
                                 init="xavier", dtype=dt)
        self.s_projector = (Linear(de, dh, axes=("embed", "mlp"), keys=rngs.params, dtype=dt)
                            if de != dh else None)
        self.t_embedder = TimestepEmbedder(de, rngs=rngs, num_freqs=NUM_FREQS, dtype=dt)
        self.y_embedder = LabelEmbedder(cfg.num_label_rows, de, rngs=rngs, dtype=dt)
        self.final_layer = FinalLayer(dh, c, rngs=rngs, dtype=dt)
        self.enc_feat_rope = RoPE(de // he, cfg.input_size)
        self.dec_feat_rope = RoPE(dh // hh, cfg.input_size)
        encoder = [DDTBlock(de, he, cfg.mlp_ratio, rngs=rngs, dtype=dt,
                            attention_impl=cfg.attention_impl) for _ in range(le)]
        head = [DDTBlock(dh, hh, cfg.mlp_ratio, rngs=rngs, dtype=dt,
                         attention_impl=cfg.attention_impl) for _ in range(lh)]
        if cfg.scan_blocks:  # the same weights as unrolled, stacked (`block_stacks`)
            self.encoder_blocks = scan.stack_modules(encoder)
            self.head_blocks = scan.stack_modules(head)
        else:
            self.blocks = nnx.List(encoder + head)

    @property
    def null_label(self) -> int:
        return self.config.null_label

    def _run_blocks(self, stream: str, h: jax.Array, cond: jax.Array, cos: jax.Array,
                    sin: jax.Array) -> jax.Array:
        """`h` through the "encoder" or "head" blocks: one lax.scan over the stacked
        module with `scan_blocks`, else a Python loop; each block rematerialised by the
        config's remat policy."""
        cfg = self.config
        if cfg.scan_blocks:
            stack = self.encoder_blocks if stream == "encoder" else self.head_blocks
            return scan.scan_modules(stack, lambda block, c: _block(block, c, cond, cos, sin),
                                     h, remat=cfg.remat_policy)
        le = cfg.depth[0]
        run = _block_runner(cfg.remat_policy)
        for block in (self.blocks[:le] if stream == "encoder" else self.blocks[le:]):
            h = run(block, h, cond, cos, sin)
        return h

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cfg = self.config
        b, hgt, wdt, c = x.shape
        if (hgt, wdt, c) != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(f"DiTDH expects x of shape (B, {cfg.input_size}, "
                             f"{cfg.input_size}, {cfg.in_channels}), got {x.shape}")
        st = cfg.stream_dtype  # float32 but under "bfloat16_all"; Linears cast operands
        tok = x.reshape(b, hgt * wdt, c)  # token n = i*S + j
        temb = self.t_embedder(t).astype(st)
        cond = temb + self.y_embedder(y).astype(st) if cfg.use_y_conditioning else temb
        cond = jax.nn.silu(cond)[:, None, :]

        s = self.s_embedder(tok, out_dtype=st) + self.pos_embed[...].astype(st)
        enc_cos, enc_sin = self.enc_feat_rope.freqs_cos[...], self.enc_feat_rope.freqs_sin[...]
        s = self._run_blocks("encoder", s, cond, enc_cos, enc_sin)
        s = jax.nn.silu(temb[:, None, :] + s)
        if self.s_projector is not None:
            s = self.s_projector(s, out_dtype=st)

        h = self.x_embedder(tok, out_dtype=st)  # the head stream: float32 too (autocast: bf16)
        dec_cos, dec_sin = self.dec_feat_rope.freqs_cos[...], self.dec_feat_rope.freqs_sin[...]
        h = self._run_blocks("head", h, s, dec_cos, dec_sin)
        out = self.final_layer(h, s)
        return out.astype(jnp.float32).reshape(b, hgt, wdt, c)


def _block(block, h, cond, cos, sin):
    return block(h, cond, cos, sin)


_remat_block = nnx.remat(_block)
_REMAT_RUNNERS = {"none": _block, "full": _remat_block}


def _block_runner(policy: str):
    """`_block`, or it under nnx.remat with the checkpoint policy `policy` (unrolled
    blocks; the scanned ones are rematerialised inside `scan.scan_modules`)."""
    if policy not in _REMAT_RUNNERS:
        _REMAT_RUNNERS[policy] = nnx.remat(_block, policy=scan.checkpoint_policy(policy))
    return _REMAT_RUNNERS[policy]


# ----------------------------------------------------------------------------------------
# Upstream key map: one table drives conversion (torch -> flax) and export (flax -> torch).

COPY, LINEAR, CONV1X1 = "copy", "linear", "conv1x1"


@dataclasses.dataclass(frozen=True)
class KeySpec:
    torch_key: str
    path: str  # "/"-joined path in nnx.state(model)
    kind: str  # COPY, LINEAR (W^T) or CONV1X1 (W[:, :, 0, 0]^T)
    torch_shape: tuple[int, ...]
    layer: int | None = None  # index along the stacked axis of `path` (scan_blocks)


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
    return _stacked_specs(specs, cfg) if cfg.scan_blocks else specs


def block_stacks(cfg: DiTDHConfig) -> tuple[scan.LayerStack, scan.LayerStack]:
    """Where the blocks live in both layouts: unrolled `blocks/{i}` (encoder first, then
    head, as upstream's `blocks.{i}`) and stacked `encoder_blocks` / `head_blocks`."""
    le, lh = cfg.depth
    return (scan.LayerStack("encoder_blocks", tuple(f"blocks/{i}" for i in range(le))),
            scan.LayerStack("head_blocks", tuple(f"blocks/{i}" for i in range(le, le + lh))))


def _stacked_specs(specs: list[KeySpec], cfg: DiTDHConfig) -> list[KeySpec]:
    """Per-layer block paths "blocks/{i}/..." as (stacked path, layer index)."""
    where = {layer: (stack.stacked, k) for stack in block_stacks(cfg)
             for k, layer in enumerate(stack.layers)}
    out = []
    for spec in specs:
        parts = spec.path.split("/")
        hit = where.get("/".join(parts[:2])) if parts[0] == "blocks" else None
        out.append(spec if hit is None else dataclasses.replace(
            spec, path="/".join([hit[0], *parts[2:]]), layer=hit[1]))
    return out


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
    missing, unexpected or mis-shaped entries raise one error naming them. The blocks may
    come in either layout, unrolled or stacked (`arrays_in_layout`)."""
    abstract = abstract_model(config)
    arrays = arrays_in_layout(abstract, arrays, source=source)
    return module_from_arrays(abstract, arrays, source=source, mesh=mesh)


def arrays_in_layout(model: DiTDH, arrays: Mapping[str, np.ndarray], *, source: str
                     ) -> Mapping[str, np.ndarray]:
    """`arrays` with the blocks unrolled ("blocks/{i}/...") or stacked ("encoder_blocks/...",
    `scan_blocks`), whichever they are, checked strictly in the layout they are in (errors
    name the stored keys), in the layout of `model` (shape-only is enough)."""
    stacks = block_stacks(model.config)
    stored = scan.is_stacked(arrays, stacks)
    want = model.config.scan_blocks
    if stored is None or stored == want:
        return arrays
    expected = {name: tuple(v.shape) for name, v in flat_state(model).items()}
    expected = scan.unstack_shapes(expected, stacks) if want else scan.stack_shapes(
        expected, stacks)
    check_keys(expected, arrays, source)
    return scan.to_layout(arrays, stacks, stacked=want)


def _host_arrays(model: DiTDH) -> dict[str, np.ndarray]:
    vars_ = flat_state(model)
    host = parallel.global_to_host({k: v[...] for k, v in vars_.items()}, gather=True)
    return {k: np.asarray(v, np.float32) for k, v in host.items()}


def save_arrays(config: DiTDHConfig, arrays: Mapping[str, np.ndarray], out_dir: str) -> None:
    """Write {"path": array} + the config as a model directory, atomically."""
    directory.write(out_dir, MODEL_DIR, config.to_dict(), arrays)


def save_ditdh(model: DiTDH, out_dir: str, *, scan_blocks: bool | None = None) -> None:
    """Write the model (weights gathered to the host) in the format `load_ditdh` reads,
    with the blocks stacked or unrolled as `scan_blocks` says (None: as the model has them)."""
    arrays = _host_arrays(model)  # every process takes part in the gather
    if jax.process_index() != 0:
        return
    config = model.config
    if scan_blocks is not None and scan_blocks != config.scan_blocks:
        arrays = scan.to_layout(arrays, block_stacks(config), stacked=scan_blocks)
        config = dataclasses.replace(config, scan_blocks=scan_blocks)
    save_arrays(config, arrays, out_dir)


def load_ditdh(model_dir: str, *, mesh=None, compute_dtype: str | None = None,
               scan_blocks: bool | None = None) -> DiTDH:
    """Load a model directory (converted or saved); shards the variables over `mesh` when
    one is given. `compute_dtype` overrides the saved one; `scan_blocks` chooses stacked or
    unrolled blocks whatever the directory stores (None: as saved; directories from before
    scan_blocks are unrolled)."""
    def abstract(saved: dict) -> DiTDH:
        config = DiTDHConfig.from_dict(saved)
        if compute_dtype is not None:
            config = dataclasses.replace(config, compute_dtype=compute_dtype)
        if scan_blocks is not None:
            config = dataclasses.replace(config, scan_blocks=scan_blocks)
        return abstract_model(config)

    return directory.load(model_dir, MODEL_DIR, abstract, mesh=mesh,
                          relayout=lambda model, arrays, path: arrays_in_layout(
                              model, arrays, source=path))


def export_torch_state_dict(model: DiTDH) -> dict[str, np.ndarray]:
    """Upstream `DiTwDDTHead.state_dict()` (names, order, NCHW/(out, in) layouts) as numpy."""
    arrays = _host_arrays(model)
    return {s.torch_key: to_torch_layout(
                s.kind, arrays[s.path] if s.layer is None else arrays[s.path][s.layer])
            for s in torch_key_map(model.config)}
