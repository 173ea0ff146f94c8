"""Reference implementations that benchmarks compare against; not part of the library.

`mmfm_jax.bench --vs-torch` loads `torch_ditdh.py` by path from a repository checkout.
"""
