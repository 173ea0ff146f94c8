"""The demo's stage 1: an identity "RAE" in pixel space.

The embedded demo runs the ImageNet code path on 8x8 digits without DINOv2: the latent is
the image mapped to [-1, 1] (channels-last, the same shape as the image) and the flattened
latent stands in for the CLS token that the CLS mixture assigns modes from. Same interface
as `mmfm_jax.rae.RAE`: `encode(images) -> (latents_nhwc, cls)`, `decode(latents) -> images`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def encode(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, C), uint8 in [0, 255] or float in [0, 1] -> (latents (B, H, W, C)
    float32 in [-1, 1], cls (B, H*W*C))."""
    images = jnp.asarray(images)
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    latents = 2.0 * x - 1.0
    return latents, latents.reshape(latents.shape[0], -1)


def decode(latents: jax.Array) -> jax.Array:
    """Inverse of `encode`: images in [0, 1] up to the model's error (no clamp, as the RAE
    decoder)."""
    return (jnp.asarray(latents, jnp.float32) + 1.0) * 0.5


class PixelEncoder(nnx.Module):
    """Identity encoder: latents = 2 x - 1 for images x in [0, 1]; no parameters."""

    def __init__(self, image_size: int, channels: int):
        self.image_size = int(image_size)
        self.channels = int(channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Module-level `encode` with a shape check."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.latent_shape:
            raise ValueError(f"PixelEncoder.encode expects images of shape (B, "
                             f"{', '.join(map(str, self.latent_shape))}), got {images.shape}")
        return encode(images)

    def decode(self, latents: jax.Array) -> jax.Array:
        return decode(latents)
