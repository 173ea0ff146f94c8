"""GMM files: the project's directory format, MM-FM's pickles (read safely), and export.

Project format (one directory, each mixture written atomically on its own, so the fit can
resume between the CLS and the spatial pass):
* `cls_mixture.npz` (weights (K,), means (K, D), variances (K, D)) + `cls_mixture.json`;
* `spatial_mixture.npz` (weights (K,), means (K, H, W, C) channels-last, variances (K,),
  counts (K,)) + `spatial_mixture.json`.

MM-FM's pickles embed sklearn objects (REFERENCE g.6, j.32). `read_mmfm_pickle` unpickles
with an allow-list: sklearn classes become plain attribute holders, numpy arrays are
rebuilt, everything else (os.system, eval, subprocess, ...) is refused by name before it
can run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile

import jax.numpy as jnp
import numpy as np

from mmfm_jax.gmm.mixture import CLSMixture, SpatialMixture

CLS_FILE = "cls_mixture"
SPATIAL_FILE = "spatial_mixture"


class GMMFileError(ValueError):
    """A refused or malformed GMM file; the message names the file, key and shape."""


class SklearnObject:
    """Stand-in for a pickled sklearn estimator: its state dict as attributes."""

    sklearn_class = "sklearn"

    def __setstate__(self, state):
        self.__dict__.update(state)


_NUMPY_GLOBALS = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
     ("numpy._core.numeric", "_frombuffer")}
_BUILTIN_GLOBALS = {("builtins", n) for n in ("set", "frozenset", "slice", "complex")} | {
    ("collections", "OrderedDict")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path
        self.holders: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "sklearn" or module.startswith("sklearn."):
            key = f"{module}.{name}"
            if key not in self.holders:
                self.holders[key] = type(name, (SklearnObject,), {"sklearn_class": key})
            return self.holders[key]
        if (module, name) in _NUMPY_GLOBALS or (module, name) in _BUILTIN_GLOBALS:
            return super().find_class(module, name)
        raise GMMFileError(f"{self.path}: refused to unpickle global {module}.{name}: only "
                           "sklearn objects, numpy arrays and plain containers are allowed")


def read_mmfm_pickle(path: str) -> dict:
    """Load one of MM-FM's GMM pickles without executing pickled code."""
    if not os.path.exists(path):
        raise GMMFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except GMMFileError:
        raise
    except Exception as e:
        raise GMMFileError(f"{path}: cannot be read as a GMM pickle: {e}") from e
    if not isinstance(obj, dict):
        raise GMMFileError(f"{path}: expected a dict with a 'model' entry, got "
                           f"{type(obj).__name__}")
    return obj


def _array(obj, key: str, path: str, shape=None) -> np.ndarray:
    if key not in obj:
        raise GMMFileError(f"{path}: key {key!r} is missing")
    a = np.asarray(obj[key] if isinstance(obj, dict) else getattr(obj, key))
    if shape is not None and a.shape != tuple(shape):
        raise GMMFileError(f"{path}: key {key!r} has shape {a.shape}, expected {tuple(shape)}")
    return a


def _model_state(obj: dict, path: str) -> dict:
    model = obj.get("model")
    if not isinstance(model, SklearnObject):
        raise GMMFileError(f"{path}: key 'model' is not a pickled sklearn GaussianMixture")
    return model.__dict__


def cls_from_mmfm(path: str) -> tuple[CLSMixture, dict]:
    """CLS mixture (float32) and info from `gmm_n{K}_diag_k-means++.pkl`."""
    obj = read_mmfm_pickle(path)
    state = _model_state(obj, path)
    if state.get("covariance_type") != "diag":
        raise GMMFileError(f"{path}: model.covariance_type is "
                           f"{state.get('covariance_type')!r}, expected 'diag'")
    means = _array(state, "means_", path)
    if means.ndim != 2:
        raise GMMFileError(f"{path}: key 'means_' has shape {means.shape}, expected (K, D)")
    k, d = means.shape
    weights = _array(state, "weights_", path, (k,))
    variances = _array(state, "covariances_", path, (k, d))
    info = {"source": os.path.abspath(path), "n_iter": int(state.get("n_iter_", -1)),
            "converged": bool(state.get("converged_", False)),
            "lower_bound": float(state.get("lower_bound_", float("nan"))),
            "metadata": _plain(obj.get("metadata", {})), "config": _plain(obj.get("config", {}))}
    return CLSMixture(jnp.asarray(weights, jnp.float32), jnp.asarray(means, jnp.float32),
                      jnp.asarray(variances, jnp.float32)), info


def spatial_from_mmfm(path: str, latent_shape_chw: tuple[int, int, int]
                      ) -> tuple[SpatialMixture, np.ndarray, dict]:
    """Spatial mixture with means reordered from C,H,W flattening to (K, H, W, C), counts,
    info, from `spatial_gmm_from_cls_n{K}_diag_k-means++_flip.pkl`."""
    obj = read_mmfm_pickle(path)
    c, h, w = (int(v) for v in latent_shape_chw)
    means = _array(obj, "means", path)
    if means.ndim != 2 or means.shape[1] != c * h * w:
        raise GMMFileError(f"{path}: key 'means' has shape {means.shape}, expected "
                           f"(K, {c * h * w}) for latent shape C,H,W = {c},{h},{w}")
    k = means.shape[0]
    variances = _array(obj, "variances", path, (k,))
    weights = _array(obj, "weights", path, (k,))
    counts = (_array(obj, "cluster_counts", path, (k,)).astype(np.int64)
              if "cluster_counts" in obj else np.zeros(k, np.int64))
    means_nhwc = means.reshape(k, c, h, w).transpose(0, 2, 3, 1)
    info = {"source": os.path.abspath(path), "metadata": _plain(obj.get("metadata", {})),
            "config": _plain(obj.get("config", {}))}
    mixture = SpatialMixture(jnp.asarray(weights, jnp.float32),
                             jnp.asarray(means_nhwc, jnp.float32),
                             jnp.asarray(variances, jnp.float32))
    return mixture, counts, info


def _plain(obj):
    """JSON-safe copy of pickle metadata (numpy scalars and arrays to Python values)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 16 else f"array{obj.shape}"
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


def _atomic_write(directory: str, name: str, arrays: dict, info: dict) -> None:
    """npz then json, each through a temporary file renamed into place (json last: a mixture
    counts as saved once its json exists)."""
    os.makedirs(directory, exist_ok=True)
    for suffix, write in ((".npz", lambda f: np.savez(f, **arrays)),
                          (".json", lambda f: f.write(json.dumps(info, indent=2).encode()))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}", suffix=suffix, dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, os.path.join(directory, name + suffix))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def save_cls(directory: str, mixture: CLSMixture, info: dict | None = None) -> None:
    arrays = {k: np.asarray(getattr(mixture, k), np.float32)
              for k in ("weights", "means", "variances")}
    k, d = arrays["means"].shape
    _atomic_write(directory, CLS_FILE, arrays, {"kind": "cls_diag", "n_components": k,
                                                "dim": d, **_plain(info or {})})


def save_spatial(directory: str, mixture: SpatialMixture, counts: np.ndarray | None = None,
                 info: dict | None = None) -> None:
    arrays = {k: np.asarray(getattr(mixture, k), np.float32)
              for k in ("weights", "means", "variances")}
    k = arrays["weights"].shape[0]
    arrays["counts"] = (np.zeros(k, np.int64) if counts is None
                        else np.asarray(counts, np.int64))
    _atomic_write(directory, SPATIAL_FILE, arrays, {
        "kind": "spatial_spherical", "n_components": k,
        "latent_shape_hwc": list(arrays["means"].shape[1:]), **_plain(info or {})})


def has_cls(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, CLS_FILE + ".json"))


def has_spatial(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, SPATIAL_FILE + ".json"))


def _read(directory: str, name: str, expected: dict[str, int]) -> dict[str, np.ndarray]:
    path = os.path.join(directory, name + ".npz")
    if not os.path.exists(path):
        raise GMMFileError(f"{path}: no such file (write it with `python -m convert gmm` or "
                           "--stage=fit_gmm)")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for key, ndim in expected.items():
        if key not in arrays:
            raise GMMFileError(f"{path}: key {key!r} is missing")
        if arrays[key].ndim != ndim:
            raise GMMFileError(f"{path}: key {key!r} has shape {arrays[key].shape}, expected "
                               f"{ndim} dims")
    return arrays


def load_cls(directory: str) -> CLSMixture:
    a = _read(directory, CLS_FILE, {"weights": 1, "means": 2, "variances": 2})
    k, d = a["means"].shape
    for key, shape in (("weights", (k,)), ("variances", (k, d))):
        if a[key].shape != shape:
            raise GMMFileError(f"{os.path.join(directory, CLS_FILE)}.npz: key {key!r} has shape "
                               f"{a[key].shape}, expected {shape}")
    return CLSMixture(*(jnp.asarray(a[k]) for k in ("weights", "means", "variances")))


def load_spatial(directory: str) -> tuple[SpatialMixture, np.ndarray]:
    a = _read(directory, SPATIAL_FILE, {"weights": 1, "means": 4, "variances": 1})
    k = a["means"].shape[0]
    for key in ("weights", "variances"):
        if a[key].shape != (k,):
            raise GMMFileError(f"{os.path.join(directory, SPATIAL_FILE)}.npz: key {key!r} has "
                               f"shape {a[key].shape}, expected ({k},)")
    return (SpatialMixture(*(jnp.asarray(a[k]) for k in ("weights", "means", "variances"))),
            a.get("counts", np.zeros(k, np.int64)))


def load(directory: str) -> tuple[CLSMixture, SpatialMixture]:
    """(cls_mixture, spatial_mixture) from a project GMM directory; the mode index is shared,
    so both must have the same number of components."""
    cls_mixture = load_cls(directory)
    spatial, _ = load_spatial(directory)
    if spatial.n_components != cls_mixture.n_components:
        raise GMMFileError(f"{directory}: the CLS mixture has {cls_mixture.n_components} "
                           f"components but the spatial mixture {spatial.n_components}")
    return cls_mixture, spatial


def export_mmfm_pickles(cls_mixture: CLSMixture, spatial: SpatialMixture, cls_path: str,
                        spatial_path: str, counts: np.ndarray | None = None,
                        labels: np.ndarray | None = None) -> None:
    """Write MM-FM's two pickles (sklearn GaussianMixture objects, C,H,W-flattened spatial
    means, float64), for use with the upstream code. Needs scikit-learn."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as e:
        raise GMMFileError("exporting MM-FM pickles needs scikit-learn installed") from e
    w = np.asarray(cls_mixture.weights, np.float64)
    mu = np.asarray(cls_mixture.means, np.float64)
    var = np.asarray(cls_mixture.variances, np.float64)
    k, d = mu.shape
    cls_model = GaussianMixture(k, covariance_type="diag", init_params="k-means++",
                                max_iter=100, reg_covar=1e-6, random_state=42)
    cls_model.weights_, cls_model.means_, cls_model.covariances_ = w, mu, var
    cls_model.precisions_cholesky_ = 1.0 / np.sqrt(var)
    cls_model.precisions_ = 1.0 / var
    cls_model.converged_, cls_model.n_iter_, cls_model.lower_bound_ = True, 0, -np.inf
    cls_model.n_features_in_ = d
    cls_obj = {"model": cls_model,
               "labels": np.zeros(0, np.int64) if labels is None else np.asarray(labels),
               "config": {"n_components": k, "covariance_type": "diag",
                          "init_params": "k-means++"},
               "metrics": {}, "metadata": {"hidden_size": d}}
    sm = np.asarray(spatial.means, np.float64)
    flat = sm.transpose(0, 3, 1, 2).reshape(k, -1)
    sv = np.asarray(spatial.variances, np.float64)
    sw = np.asarray(spatial.weights, np.float64)
    sp_model = GaussianMixture(k, covariance_type="spherical", random_state=42)
    sp_model.weights_, sp_model.means_, sp_model.covariances_ = sw, flat, sv
    sp_model.precisions_cholesky_ = 1.0 / np.sqrt(sv + 1e-8)
    sp_model.converged_, sp_model.n_iter_, sp_model.lower_bound_ = True, 0, -np.inf
    sp_model.n_features_in_ = flat.shape[1]
    counts = np.zeros(k, np.int64) if counts is None else np.asarray(counts, np.int64)
    sp_obj = {"model": sp_model, "means": flat, "variances": sv, "weights": sw,
              "cluster_counts": counts,
              "config": {"n_components": k, "covariance_type": "spherical",
                         "flip_augmentation": True},
              "metadata": {"num_samples": int(counts.sum()), "spatial_dim": flat.shape[1]}}
    for path, obj in ((cls_path, cls_obj), (spatial_path, sp_obj)):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
