"""EM against scikit-learn, k-means++ recovery, sharded/streamed equivalence, the spatial
statistics against float64 numpy, assignment inside jit and the source sampler."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.cluster import kmeans_plusplus
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from mmfm_jax import parallel
from mmfm_jax.gmm import (
    CLSMixture,
    SpatialMixture,
    fit_diag_gmm,
    fit_from_batches,
    io,
    spatial_pass,
)
from mmfm_jax.gmm.em import _Data, kmeans_plusplus_indices


def _planted(n, k, d, seed, spread=3.0, offset=5.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (k, d))
    scales = rng.uniform(0.5, 1.5, (k, d))
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.normal(0, 1, (n, d)) * scales[labels] + offset
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def synthetic():
    x, _ = _planted(800, 4, 6, seed=0)
    rng = np.random.default_rng(1)
    w0 = np.full(4, 0.25)
    m0 = x[rng.choice(800, 4, replace=False)].astype(np.float64) + rng.normal(0, 0.5, (4, 6))
    v0 = np.full((4, 6), 2.0)
    ref = GaussianMixture(4, covariance_type="diag", max_iter=20, tol=0, weights_init=w0,
                          means_init=m0, precisions_init=1 / v0).fit(x.astype(np.float64))
    return x, (w0, m0, v0), ref


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_em_matches_sklearn_from_identical_init(synthetic, x64):
    x, init, ref = synthetic
    with jax.enable_x64(x64):
        data = x.astype(np.float64) if x64 else x
        fit = fit_diag_gmm(data, 4, max_iter=20, tol=0.0, init=init)
        errs = (_rel(fit.weights, ref.weights_), _rel(fit.means, ref.means_),
                _rel(fit.variances, ref.covariances_), abs(fit.lower_bound / ref.lower_bound_ - 1))
        bic_err = abs(fit.bic / ref.bic(x.astype(np.float64)) - 1)
    print(f"x64={x64}: rel err weights {errs[0]:.1e} means {errs[1]:.1e} variances {errs[2]:.1e}"
          f" lower bound {errs[3]:.1e} bic {bic_err:.1e}")
    assert fit.n_iter == ref.n_iter_ == 20
    assert max(errs[:3]) < (1e-10 if x64 else 1e-4)
    assert errs[3] < (1e-12 if x64 else 1e-5)
    assert bic_err < 1e-5
    np.testing.assert_allclose(fit.history, ref.lower_bounds_, rtol=1e-5)


def test_kmeans_plusplus_and_full_fit_match_sklearn_in_float64():
    x, _ = _planted(500, 5, 8, seed=3)
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        idx = kmeans_plusplus_indices(_Data(x, 128, None, stream=True), 5, 42)
        fit = fit_diag_gmm(x, 5, seed=42)
    _, ref_idx = kmeans_plusplus(x, 5, random_state=np.random.RandomState(42))
    np.testing.assert_array_equal(idx, ref_idx)
    ref = GaussianMixture(5, covariance_type="diag", init_params="k-means++",
                          random_state=42).fit(x)
    assert fit.n_iter == ref.n_iter_ and fit.converged
    np.testing.assert_allclose(fit.history, ref.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(fit.means), ref.means_, rtol=1e-9, atol=1e-12)


def test_kmeans_plusplus_fit_recovers_planted_modes():
    x, labels = _planted(1200, 8, 16, seed=4, spread=4.0)
    fit = fit_diag_gmm(x, 8, seed=0)
    pred = np.asarray(fit.mixture.predict(x))
    ari = adjusted_rand_score(labels, pred)
    print(f"ARI {ari:.4f} after {fit.n_iter} iterations")
    assert fit.converged and ari >= 0.95
    assert np.all(np.diff(fit.history[1:]) > -1e-4)  # EM never goes down


def test_sharded_and_streamed_equal_single_device_in_memory():
    x, _ = _planted(1003, 6, 12, seed=5)  # not a multiple of 8: padded rows are masked
    mesh = parallel.make_mesh()
    kwargs = dict(max_iter=5, tol=0.0, seed=7, chunk_size=256)
    base = fit_diag_gmm(x, 6, **kwargs)  # k-means++, one device, in memory
    runs = {
        "sharded": fit_diag_gmm(x, 6, mesh=mesh, **kwargs),
        "sharded+streamed": fit_diag_gmm(x, 6, mesh=mesh, stream=True, **kwargs),
    }
    # a chunk callable has no random access for k-means++: both start from explicit params
    init = tuple(np.asarray(a) for a in (base.weights, base.means, base.variances))
    in_memory = fit_diag_gmm(x, 6, max_iter=3, tol=0.0, init=init, chunk_size=256)
    runs["streamed callable"] = fit_diag_gmm(
        lambda: (x[i:i + 256] for i in range(0, 1003, 256)), 6, mesh=mesh, max_iter=3,
        tol=0.0, init=init, chunk_size=256)
    for name, fit in runs.items():
        ref = in_memory if name == "streamed callable" else base
        for field in ("weights", "means", "variances"):
            want = np.asarray(getattr(ref, field), np.float64)
            err = np.abs(np.asarray(getattr(fit, field)) - want).max() / np.abs(want).max()
            assert err < 1e-5, (name, field, err)
        assert abs(fit.lower_bound / ref.lower_bound - 1) < 1e-5, name
    assert runs["sharded"].mixture.means.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="k-means\\+\\+' needs random access"):
        fit_diag_gmm(lambda: iter([x]), 6)


def _spatial_reference(latents, labels, k, flip):
    """float64 numpy: per-mode mean and mean-over-dims variance (ddof 0), flips included;
    empty modes get what MM-FM's spatial_gmm_imagenet.py gives them: the unweighted mean of
    the non-empty modes' means and the mean of their variances (REFERENCE e.2)."""
    lat = latents.astype(np.float64)
    if flip:
        lat = np.concatenate([lat, lat[:, :, ::-1, :]])
        labels = np.concatenate([labels, labels])
    flat = lat.reshape(len(lat), -1)
    means = np.empty((k, flat.shape[1]))
    variances = np.empty(k)
    counts = np.bincount(labels, minlength=k)
    for j in np.flatnonzero(counts):
        rows = flat[labels == j]
        means[j], variances[j] = rows.mean(0), rows.var(0).mean()
    empty = counts == 0
    means[empty] = means[~empty].mean(0)
    variances[empty] = variances[~empty].mean()
    return means.reshape(k, *latents.shape[1:]), variances, counts


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_spatial_statistics_equal_float64_numpy(sharded):
    k, rng = 8, np.random.default_rng(6)
    cls_mixture = CLSMixture(jnp.full((k,), 1 / k), jnp.asarray(rng.normal(0, 5, (k, 4))),
                             jnp.ones((k, 4)))
    cls_tokens = (np.asarray(cls_mixture.means)[rng.integers(0, k - 1, 45)]
                  + rng.normal(0, 0.1, (45, 4))).astype(np.float32)  # mode k-1 stays empty
    labels = np.asarray(cls_mixture.predict(cls_tokens))
    latents = (rng.normal(0, 1.0, (45, 4, 3, 5)) * rng.uniform(0.5, 2, (1, 4, 3, 5))
               + rng.normal(0, 1, (1, 4, 3, 5)) * 3).astype(np.float32)
    batches = [(latents[i:i + 13], cls_tokens[i:i + 13]) for i in range(0, 45, 13)]
    mesh = parallel.make_mesh() if sharded else None
    spatial, counts = spatial_pass(batches, cls_mixture, mesh=mesh, flip=True)
    ref_means, ref_vars, ref_counts = _spatial_reference(latents, labels, k, flip=True)
    assert counts[k - 1] == 0 and counts.sum() == 90
    # the planted empty mode: upstream's fill differs from the count-weighted data mean and
    # the total variance (which includes the spread between the modes' means)
    flat = np.concatenate([latents, latents[:, :, ::-1]]).reshape(90, -1).astype(np.float64)
    assert np.abs(ref_means[k - 1].reshape(-1) - flat.mean(0)).max() > 1e-3
    assert ref_vars[k - 1] < flat.var(0).mean() - 1e-3
    np.testing.assert_array_equal(counts, ref_counts)
    err_m = np.abs(np.asarray(spatial.means) - ref_means).max()
    err_v = np.abs(np.asarray(spatial.variances) / ref_vars - 1).max()
    print(f"spatial means max abs err {err_m:.1e}, variances max rel err {err_v:.1e}")
    assert err_m < 1e-5 and err_v < 1e-5
    np.testing.assert_array_equal(np.asarray(spatial.weights), np.asarray(cls_mixture.weights))
    if sharded:
        assert not spatial.means.sharding.is_fully_replicated  # accumulated over "modes"
    by_label, _ = spatial_pass([(latents, labels)], cls_mixture, flip=False)
    ref_means, ref_vars, _ = _spatial_reference(latents, labels, k, flip=False)
    np.testing.assert_allclose(np.asarray(by_label.means), ref_means, atol=1e-5)
    np.testing.assert_allclose(np.asarray(by_label.variances), ref_vars, rtol=1e-5)


def test_assign_soft_and_hard_inside_jit():
    mixture = CLSMixture(jnp.asarray([0.3, 0.7]), jnp.asarray([[-1.0, 0.0], [1.0, 0.0]]),
                         jnp.ones((2, 2)))
    x = jnp.asarray([[0.2, 0.0], [-3.0, 1.0]])
    assign = jax.jit(mixture.assign, static_argnames="mode")
    np.testing.assert_array_equal(assign(jax.random.key(0), x, mode="hard"), [1, 0])
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = jax.jit(jax.vmap(lambda key: mixture.assign(key, x, mode="soft")))(keys)
    freq = np.asarray(draws[:, 0]).mean()
    expect = float(mixture.predict_proba(x)[0, 1])
    print(f"soft assignment frequency {freq:.3f} vs posterior {expect:.3f}")
    assert 0.5 < expect < 0.95 and abs(freq - expect) < 0.03
    with pytest.raises(ValueError, match="'argmax'"):
        mixture.assign(jax.random.key(0), x, mode="argmax")


def test_spatial_sample_statistics():
    rng = np.random.default_rng(8)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    means = rng.normal(0, 2, (3, 2, 2, 3)).astype(np.float32)
    variances = np.array([0.25, 1.0, 4.0], np.float32)
    mixture = SpatialMixture(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(variances))
    modes = np.asarray(jax.jit(mixture.sample_modes, static_argnums=1)(jax.random.key(0), 20000))
    freq = np.bincount(modes, minlength=3) / modes.size
    assert np.abs(freq - weights).max() < 0.015, freq
    modes = np.concatenate([modes, np.full(3000, 3)])  # null label == K: N(0, I)
    x = np.asarray(jax.jit(mixture.sample)(jax.random.key(1), jnp.asarray(modes)))
    assert x.shape == (23000, 2, 2, 3)
    for k in range(4):
        rows = x[modes == k]
        mu, var = (means[k], variances[k]) if k < 3 else (0.0, 1.0)
        assert np.abs(rows.mean(0) - mu).max() < 5 * np.sqrt(var / len(rows)), k
        assert abs(rows.var(0).mean() / var - 1) < 0.03, k


def test_fit_from_batches_writes_both_and_resumes(tmp_path):
    x, _ = _planted(96, 3, 4, seed=9)
    latents = np.random.default_rng(10).normal(size=(96, 2, 2, 3)).astype(np.float32)
    cfg = ml_collections.ConfigDict(dict(num_components=3, max_iter=20, tol=1e-3,
                                         reg_covar=1e-6, init="k-means++", seed=42,
                                         chunk_size=64, screen=True, flip=True))
    batches = lambda: ((latents[i:i + 32], x[i:i + 32]) for i in range(0, 96, 32))
    lines = []
    cls1, sp1 = fit_from_batches(batches, cfg, None, str(tmp_path), lines.append)
    assert any("EM iteration 1:" in line and "s/iteration" in line for line in lines)
    c2, s2 = io.load(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(c2.means), np.asarray(cls1.means))
    np.testing.assert_array_equal(np.asarray(s2.means), np.asarray(sp1.means))
    assert io.load_spatial(str(tmp_path))[1].sum() == 192
    lines.clear()
    fit_from_batches(batches, cfg, None, str(tmp_path), lines.append)
    assert "skipping EM" in lines[0] and not any("EM iteration" in line for line in lines)


def test_bench_stream_memmap_and_projection(tmp_path):
    """The out-of-memory benchmark path: a memory map read through a chunk callable gives a
    fit, peak RSS figures and, without a GPU result, a projection marked pending; with one
    the projection scales its measured time by rows x K x D."""
    import json

    from mmfm_jax import bench, bench_gmm

    r = bench_gmm.bench_gmm_stream(3000, 16, 8, iters=2, chunk_rows=512,
                                   path=str(tmp_path / "x.npy"), print_fn=lambda s: None)
    assert r["seconds_per_iteration"] > 0 and len(r["iteration_seconds"]) == 3
    assert r["peak_rss_bytes"] >= r["peak_rss_bytes_before_fit"] > 0
    assert r["peak_anon_rss_bytes"] >= r["anon_rss_bytes_before_fit"] > 0
    assert r["projection"].startswith("pending")
    gpu = {"settings": {"n": 131072, "k": 8192, "d": 768}, "rows": [{"seconds": 2.0}],
           "environment": {"device_kind": "NVIDIA H100"}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    p = bench_gmm.projection_from_gpu(str(tmp_path / "gpu.json"), 8192, 768)
    assert p["projected_imagenet_seconds_per_iteration"] == pytest.approx(
        2.0 * 1_281_167 / 131072)
    args = bench.build_parser().parse_args(["gmm", "--iters", "4", "--stream"])
    assert args.steps == 4 and args.stream
    assert bench.build_parser().parse_args(["gmm", "--steps", "2"]).steps == 2
