"""The frozen RAE stage 1: images <-> normalised DINOv2 latents, channels-last.

`RAE.encode` = torch-exact bicubic resize to the encoder size, ImageNet normalisation,
DINOv2-with-registers, patch tokens reshaped to (B, h, w, C), then (z - mean) /
sqrt(var + eps) per channel and position (mean optional); it also returns the CLS token
(after the affine-free final LayerNorm, not latent-normalised) for MM-FM's mode
assignment. `RAE.decode` reverses the normalisation, runs the ViT decoder and undoes
the ImageNet normalisation, without clamping. Both are pure, so a jitted train or
sampling step can call them.

A converted directory (`python -m convert rae`) is a model directory of the common
format (`models/model_dir.py`, "mmfm_jax.rae"): `config.json` (the RAEConfig) and
`weights.safetensors` ({"encoder/...": ..., "decoder/...": ..., "latent_var": ...}), with
statistics stored channels-last (h, w, C). `encode_sharded` / `decode_sharded` run host
batches over a mesh in fixed-size chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.models import model_dir
from mmfm_jax.models.dinov2 import Dinov2Config, Dinov2Encoder
from mmfm_jax.models.layers import Buffer, KeySeq
from mmfm_jax.models.rae_decoder import DecoderConfig, RAEDecoder
from mmfm_jax.models.state_arrays import variable_path
from mmfm_jax.models.strict_keys import check_keys
from mmfm_jax.resize import resize_bicubic

FORMAT = "mmfm_jax.rae"
MODEL_DIR = model_dir.Format(FORMAT, convert_hint="convert with `python -m convert rae`",
                             legacy=(model_dir.Layout("mmfm_jax.rae/1"),))  # before format_version
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class RAEConfig:
    encoder: Dinov2Config
    decoder: DecoderConfig
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    latent_eps: float = 1e-5
    has_latent_mean: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> RAEConfig:
        tuples = lambda sub: {k: tuple(v) if isinstance(v, list) else v
                              for k, v in sub.items()}
        return cls(encoder=Dinov2Config(**tuples(d["encoder"])),
                   decoder=DecoderConfig(**tuples(d["decoder"])),
                   image_mean=tuple(d["image_mean"]), image_std=tuple(d["image_std"]),
                   latent_eps=float(d["latent_eps"]),
                   has_latent_mean=bool(d["has_latent_mean"]))

    def validate(self) -> None:
        enc, dec = self.encoder, self.decoder
        if enc.grid_size != dec.grid_size or enc.hidden_size != dec.in_dim:
            raise ValueError(f"encoder tokens {enc.grid_size}x{enc.hidden_size} do not fit "
                             f"the decoder input {dec.grid_size}x{dec.in_dim}")


class RAE(nnx.Module):
    """Frozen encoder + decoder + latent statistics. See the module docstring."""

    def __init__(self, cfg: RAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg.validate()
        self.cfg = cfg
        keys = KeySeq(rngs.params())
        self.encoder = Dinov2Encoder(cfg.encoder, keys=keys, dtype=dtype)
        self.decoder = RAEDecoder(cfg.decoder, keys=keys, dtype=dtype)
        shape = (*cfg.encoder.grid_size, cfg.encoder.hidden_size)
        self.latent_var = Buffer(jnp.ones(shape))
        self.latent_mean = Buffer(jnp.zeros(shape)) if cfg.has_latent_mean else None

    @property
    def image_size(self) -> tuple[int, int]:
        """Size of decoded images (and of the images `encode` is meant to receive)."""
        return self.cfg.decoder.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.cfg.encoder.grid_size, self.cfg.encoder.hidden_size)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[0, 1] images -> encoder input: bicubic resize (skipped at the encoder size),
        then (x - mean) / std with the encoder processor's constants, float32."""
        x = resize_bicubic(images, self.cfg.encoder.input_size)
        mean = jnp.asarray(self.cfg.image_mean, jnp.float32)
        std = jnp.asarray(self.cfg.image_std, jnp.float32)
        return (x - mean) / std

    def _scale(self) -> jax.Array:
        return jnp.sqrt(self.latent_var[...] + jnp.float32(self.cfg.latent_eps))

    def normalize(self, latents: jax.Array) -> jax.Array:
        z = latents if self.latent_mean is None else latents - self.latent_mean[...]
        return z / self._scale()

    def denormalize(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(jnp.float32) * self._scale()
        return z if self.latent_mean is None else z + self.latent_mean[...]

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(B, H, W, 3) images in [0, 1] -> (normalised latents (B, h, w, C), CLS (B, C));
        CLS is None for an encoder without one (SigLIP2)."""
        hidden = self.encoder(self.preprocess(images))
        cls = hidden[:, 0] if self.cfg.encoder.cls_token else None
        patches = hidden[:, self.cfg.encoder.num_prefix_tokens:]
        latents = patches.reshape(patches.shape[0], *self.latent_shape)
        return self.normalize(latents), cls

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, C) normalised latents -> (B, H, W, 3) images, float32, not clamped."""
        x = self.decoder(self.denormalize(latents))
        std = jnp.asarray(self.cfg.image_std, jnp.float32)
        mean = jnp.asarray(self.cfg.image_mean, jnp.float32)
        return x * std + mean


# ------------------------------------------------------------------------------ files


def abstract_rae(cfg: RAEConfig, dtype=jnp.float32) -> RAE:
    """The model with shape-only variables (nothing allocated)."""
    return nnx.eval_shape(lambda: RAE(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def expected_shapes(cfg: RAEConfig) -> dict[str, tuple[int, ...]]:
    """{"encoder/layers/0/attn/query/kernel": shape, ...}: every array a directory holds."""
    return dict(_expected_shapes(cfg))


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: RAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    _, state = nnx.split(abstract_rae(cfg))
    return tuple((variable_path(path), tuple(v.shape)) for path, v in nnx.to_flat_state(state))


def check_arrays(cfg: RAEConfig, arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse any missing, unexpected or mis-shaped array, naming all of them at once."""
    check_keys(expected_shapes(cfg), arrays, source)


def write_rae(out_dir: str, cfg: RAEConfig, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the model directory `out_dir` (config.json + weights.safetensors) atomically,
    after checking `arrays` against `cfg`."""
    check_arrays(cfg, arrays, out_dir)
    model_dir.write(out_dir, MODEL_DIR, cfg.to_dict(), arrays)


def _compute_dtype(name: str):
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={name!r}; use one of {list(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def load_rae(rae_dir: str, *, mesh=None, compute_dtype: str = "float32") -> RAE:
    """The RAE of a converted directory, float32 parameters, `compute_dtype` matmuls; on
    `mesh`, variables are placed by their logical axis names (width axes over `fsdp`, the
    rest replicated)."""
    dtype = _compute_dtype(compute_dtype)
    return model_dir.load(rae_dir, MODEL_DIR,
                          lambda saved: abstract_rae(RAEConfig.from_dict(saved), dtype),
                          mesh=mesh)


# ------------------------------------------------------------------ sharded host batches


@functools.lru_cache(maxsize=16)
def _jitted(graphdef, method: str):
    return jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))


def _apply_sharded(rae: RAE, method: str, x: np.ndarray, mesh, batch_size: int | None):
    if len(x) == 0:
        raise ValueError(f"RAE.{method}: empty batch")
    graphdef, state = nnx.split(rae)
    state = parallel.replicate_unplaced(state, mesh)  # loaded without a mesh: replicate
    fn = _jitted(graphdef, method)
    local_shards = max(parallel.num_batch_shards(mesh) // jax.process_count(), 1)
    n = len(x)
    step = parallel.round_up(batch_size or n, local_shards)
    outputs = []
    for start in range(0, n, step):
        chunk = np.asarray(x[start:start + step])
        rows = len(chunk)
        if rows < step:  # pad with copies of the last row: one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - rows, 0)])
        out = parallel.global_to_host(fn(state, parallel.host_to_global(chunk, mesh)))
        outputs.append(jax.tree.map(lambda a, r=rows: a[:r], out))
    return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *outputs)


def encode_sharded(rae: RAE, images: np.ndarray, *, mesh,
                   batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode this process's host images (N, H, W, 3) in chunks of `batch_size` rows,
    each split over the mesh's batch axes; returns numpy (latents, cls) for these rows.

    Every process must make the same number of calls with the same N and batch_size.
    """
    return _apply_sharded(rae, "encode", images, mesh, batch_size)


def decode_sharded(rae: RAE, latents: np.ndarray, *, mesh,
                   batch_size: int | None = None) -> np.ndarray:
    """Decode this process's host latents (N, h, w, C) like `encode_sharded`."""
    return _apply_sharded(rae, "decode", latents, mesh, batch_size)
