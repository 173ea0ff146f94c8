"""Converters from upstream PyTorch/sklearn artifacts to mmfm_jax directories.

torch is imported only here (and in tests): a TPU VM that samples converted models never
needs it.
"""
