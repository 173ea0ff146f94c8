"""GMM files: MM-FM's fixture pickles through the safe unpickler and the converter, the
project format round trip, export back to the pickle layout, refusal of code in pickles."""

import argparse
import os
import pickle

import jax
import numpy as np
import pytest

import convert.gmm as convert_gmm
from convert.common import ConversionError
from mmfm_jax import gmm
from mmfm_jax.gmm import io
from tests.conftest import fixture_path, load_cases

CLS_PKL = ("gmm", "gmm_n6_diag_k-means++.pkl")
SPATIAL_PKL = ("gmm", "spatial_gmm_from_cls_n6_diag_k-means++_flip.pkl")


def _convert(out_dir, latent_shape="8,4,4", cls=None, spatial=None):
    parser = argparse.ArgumentParser()
    convert_gmm.add_arguments(parser)
    convert_gmm.run(parser.parse_args([
        "--cls", cls or fixture_path(*CLS_PKL), "--spatial", spatial or fixture_path(*SPATIAL_PKL),
        "--latent-shape", latent_shape, "--out", str(out_dir)]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm") / "converted"
    _convert(out)
    return gmm.load(str(out))


def test_converted_cls_mixture_reproduces_sklearn(converted):
    cls_mixture, _ = converted
    cases = load_cases("gmm", "cases.npz")
    q = cases["cls_queries"]
    proba = np.asarray(jax.jit(cls_mixture.predict_proba)(q))
    score = np.asarray(jax.jit(cls_mixture.log_prob)(q))
    pred = np.asarray(jax.jit(cls_mixture.predict)(q))
    err_p = np.abs(proba - cases["predict_proba"]).max()
    err_s = np.abs(score / cases["score_samples"] - 1).max()
    print(f"predict_proba max abs err {err_p:.2e}, score_samples max rel err {err_s:.2e}")
    assert err_p < 1e-5
    assert err_s < 1e-5
    np.testing.assert_array_equal(pred, cases["predict"])


def test_converted_spatial_means_are_channels_last(converted):
    _, spatial = converted
    raw = io.read_mmfm_pickle(fixture_path(*SPATIAL_PKL))
    c, h, w = load_cases("gmm", "cases.npz")["latent_shape_chw"]
    assert spatial.means.shape == (6, h, w, c) == (6, 4, 4, 8)
    expect = raw["means"].reshape(6, c, h, w).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(spatial.means), expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(spatial.variances), raw["variances"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(spatial.weights), raw["weights"], rtol=1e-6)
    # one element by hand: mode 3, channel 5, row 2, column 1 (C-major flattening)
    assert np.asarray(spatial.means)[3, 2, 1, 5] == np.float32(raw["means"][3, 5 * 16 + 2 * 4 + 1])


def test_converter_refuses_wrong_latent_shape(tmp_path):
    with pytest.raises(ConversionError, match=r"key 'means' has shape \(6, 128\).*4,4,4"):
        _convert(tmp_path / "bad", latent_shape="4,4,4")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConversionError, match="three positive integers"):
        _convert(tmp_path / "bad", latent_shape="8,4")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _Evil(marker), "means": np.zeros((2, 3))}))
    with pytest.raises(io.GMMFileError, match=r"refused to unpickle global (posix|os)\.system"):
        io.read_mmfm_pickle(str(path))
    assert not marker.exists()
    with pytest.raises(ConversionError, match="refused to unpickle global"):
        _convert(tmp_path / "out", cls=str(path))
    assert not marker.exists() and not (tmp_path / "out").exists()
    path.write_bytes(pickle.dumps({"x": eval}))
    with pytest.raises(io.GMMFileError, match=r"builtins\.eval"):
        io.read_mmfm_pickle(str(path))


def test_export_roundtrip_through_sklearn_and_restricted_reader(converted, tmp_path):
    from sklearn.mixture import GaussianMixture

    cls_mixture, spatial = converted
    cls_path, sp_path = str(tmp_path / "cls.pkl"), str(tmp_path / "sp.pkl")
    io.export_mmfm_pickles(cls_mixture, spatial, cls_path, sp_path,
                           counts=np.full(6, 80), labels=np.arange(6))
    with open(cls_path, "rb") as f:
        model = pickle.load(f)["model"]  # our own file: plain pickle with sklearn present
    assert isinstance(model, GaussianMixture)
    q = load_cases("gmm", "cases.npz")["cls_queries"].astype(np.float64)
    np.testing.assert_allclose(model.predict_proba(q),
                               np.asarray(cls_mixture.predict_proba(q)), atol=1e-5)
    cls_back, _ = io.cls_from_mmfm(cls_path)
    sp_back, counts, _ = io.spatial_from_mmfm(sp_path, (8, 4, 4))
    np.testing.assert_array_equal(np.asarray(cls_back.means), np.asarray(cls_mixture.means))
    np.testing.assert_array_equal(np.asarray(sp_back.means), np.asarray(spatial.means))
    np.testing.assert_array_equal(counts, np.full(6, 80))


def test_project_format_roundtrip_and_errors(converted, tmp_path):
    cls_mixture, spatial = converted
    io.save_cls(str(tmp_path), cls_mixture)
    with pytest.raises(io.GMMFileError, match="spatial_mixture.npz: no such file"):
        gmm.load(str(tmp_path))
    io.save_spatial(str(tmp_path), spatial, np.arange(6))
    c2, s2 = gmm.load(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(c2.variances), np.asarray(cls_mixture.variances))
    np.testing.assert_array_equal(np.asarray(s2.means), np.asarray(spatial.means))
    np.testing.assert_array_equal(io.load_spatial(str(tmp_path))[1], np.arange(6))
    np.savez(tmp_path / "cls_mixture.npz", weights=np.ones(6), means=np.zeros((6, 16)),
             variances=np.ones((5, 16)))
    with pytest.raises(io.GMMFileError, match=r"'variances' has shape \(5, 16\), expected"):
        io.load_cls(str(tmp_path))
