"""Named flat arrays <-> NNX state, shared by every network's loader.

A model directory (`model_dir`) stores every variable under its "path/to/variable" name;
loading fills an abstract (shape-only) model with those arrays, strictly (`strict_keys`),
placed on the mesh by their logical axes.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.models.strict_keys import check_keys


def variable_path(path) -> str:
    """A tree path (nnx/jax keys) as the "a/b/0/c" name used in converted directories."""
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_variables(tree) -> dict[str, nnx.Variable]:
    """{"path/to/var": Variable} for every variable of a state (or pure dict) tree."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {variable_path(path): var for path, var in leaves}


def variable_sharding(var: nnx.Variable, mesh) -> jax.sharding.NamedSharding:
    """NamedSharding of one variable from its logical axes; dims the mesh does not divide
    (and un-annotated constants) stay replicated."""
    axes = var.get_metadata().get("out_sharding")
    return parallel.logical_sharding(mesh, axes, shape=tuple(var.shape))


def _merge_from_arrays(graphdef, state, arrays: Mapping[str, np.ndarray], mesh=None):
    """The module `graphdef` with every variable of the abstract `state` replaced by
    `arrays[path]` as float32 (on `mesh` by its logical axes when given). The caller has
    checked that names and shapes match."""
    def fill(path, var):
        value = np.asarray(arrays[variable_path(path)], np.float32)
        if mesh is None:
            return var.replace(jnp.asarray(value))
        return var.replace(jax.device_put(value, variable_sharding(var, mesh)))

    state = jax.tree_util.tree_map_with_path(fill, state,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def module_from_arrays(abstract: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str,
                       mesh=None):
    """`abstract` (a shape-only module) with every variable taken from `arrays`, strictly:
    missing, unexpected or mis-shaped entries raise one ValueError naming `source`."""
    graphdef, state = nnx.split(abstract)
    expected = {name: tuple(var.shape) for name, var in flat_variables(state).items()}
    check_keys(expected, arrays, source)
    return _merge_from_arrays(graphdef, state, arrays, mesh)
