"""mmfm_jax: MM-FM (Flow Matching for Multimodal Distributions) in JAX/Flax."""

__version__ = "0.1.0"
