"""Stage 1, frozen: the encoder that turns images into (latents, CLS tokens).

The trainer's step and the fit_gmm stage both encode images with it, so both build it
here: `make_encoder` (the converted RAE, or the demo's identity pixel encoder),
`place_encoder` (split, its state replicated on the mesh, ready to travel as a jit
argument) and `encode` (merge and encode uint8 or [0, 1] images).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.config import ConfigError


def make_encoder(cfg, mesh):
    """The frozen stage 1 of a run: config.rae.kind 'dinov2' (the converted RAE of
    config.rae.path, on `mesh`) or 'identity' (the demo's pixel encoder)."""
    if cfg.rae.kind == "identity":
        from mmfm_jax.pixel_encoder import PixelEncoder
        return PixelEncoder(cfg.data.image_size, cfg.model.in_channels)
    if cfg.rae.kind != "dinov2":
        raise ConfigError(f"config.rae.kind={cfg.rae.kind!r}; use 'dinov2' or 'identity'")
    from mmfm_jax import rae
    return rae.load_rae(cfg.rae.path, mesh=mesh, compute_dtype=cfg.rae.compute_dtype)


def place_encoder(encoder, mesh):
    """(graphdef, state) of `encoder`, the state's leaves not yet on `mesh` replicated."""
    graphdef, state = nnx.split(encoder)
    return graphdef, parallel.replicate_unplaced(state, mesh)


def unit_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as already in [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def encode(graphdef, state, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(latents_nhwc, cls) of a batch of images (traceable)."""
    return nnx.merge(graphdef, state).encode(unit_images(images))
