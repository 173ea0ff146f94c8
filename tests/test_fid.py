"""FID / moments / IS / precision-recall checks of mmfm_jax.fid_metrics, and the sample-file
checks of mmfm_jax.evaluate."""

import numpy as np
import pytest
import scipy.linalg

from mmfm_jax import evaluate, fid_metrics


def random_cov(rng, d, n=None):
    a = rng.standard_normal((n or 2 * d, d))
    return np.cov(a, rowvar=False) + 0.1 * np.eye(d)


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(covmean))


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_cov(rng, 64)
    assert abs(fid_metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    v1, v2 = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = fid_metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_equals_scipy_sqrtm_fid(method):
    rng = np.random.default_rng(2)
    d = 128
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
    s1, s2 = random_cov(rng, d), random_cov(rng, d) * 2.0
    want = scipy_fid(mu1, s1, mu2, s2)
    got = fid_metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_of_low_rank_covariances():
    """Few samples (both covariances singular): the eigh path, against eigvals of S1 S2."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((12, 64)), rng.standard_normal((9, 64)) + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0), b.mean(0)
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert fid_metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert abs(fid_metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"sigma2 \(3, 3\)"):
        fid_metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))


def test_streamed_moments_equal_numpy():
    rng = np.random.default_rng(3)
    feats = (rng.standard_normal((700, 2048)) * rng.uniform(0.1, 2, 2048) + 3.0)
    feats = feats.astype(np.float32)
    acc = fid_metrics.MomentAccumulator(flush_rows=256)
    for start, stop in [(0, 64), (64, 65), (65, 400), (400, 700)]:
        acc.update(feats[start:stop])
    np.testing.assert_allclose(acc.mean(), np.mean(feats.astype(np.float64), axis=0),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.cov(), np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)


def test_inception_score():
    assert fid_metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    confident = np.zeros((12000, 1008))
    confident[np.arange(12000), np.arange(12000) % 10] = 60.0  # 10 equally used classes
    assert fid_metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # splits of 5000 (5000, 5000, 2000): split 3 uses only 2 classes
    mixed = confident.copy()
    mixed[10000:] = 0.0
    mixed[np.arange(10000, 12000), np.arange(2000) % 2] = 60.0
    assert fid_metrics.inception_score(mixed) == pytest.approx((10 + 10 + 2) / 3, rel=1e-6)


def test_manifold_radii_are_kth_neighbour_distances():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, 16)).astype(np.float32)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    want = np.sort(d, axis=1)[:, 3]
    got = fid_metrics.manifold_radii(x, k=3, block=10)  # 4 row and column blocks
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_precision_recall_sanity():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((50, 32)).astype(np.float32)
    assert fid_metrics.precision_recall(ref, ref.copy(), block=16) == (1.0, 1.0)
    far = ref + 1000.0
    assert fid_metrics.precision_recall(ref, far, block=16) == (0.0, 0.0)
    # samples = the reference plus as many far points: precision 1/2, recall 1
    half = np.concatenate([ref, far])
    assert fid_metrics.precision_recall(ref, half, block=16) == (0.5, 1.0)


def test_truncated_sample_file_is_refused(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(evaluate.EvalInputError, match="truncated") as err:
        evaluate.NpzImages(str(path))
    assert str(path) in str(err.value) and "(N, H, W, 3)" in str(err.value)


@pytest.mark.parametrize("array, words", [
    (np.zeros((4, 3, 8, 8), np.uint8), ["(4, 3, 8, 8)", "NCHW"]),
    (np.zeros((4, 8, 8, 3), np.float32), ["float32", "uint8"]),
    (np.zeros((8, 8, 3), np.uint8), ["(8, 8, 3)"]),
])
def test_wrong_sample_layout_is_refused(tmp_path, array, words):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=array)
    with pytest.raises(evaluate.EvalInputError) as err:
        evaluate.NpzImages(str(path))
    msg = str(err.value)
    assert str(path) in msg and "(N, H, W, 3), NHWC" in msg
    for word in words:
        assert word in msg


def test_missing_arr_0_and_bad_reference_are_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(evaluate.EvalInputError, match="no 'arr_0' array"):
        evaluate.NpzImages(str(path))
    with pytest.raises(evaluate.EvalInputError, match="needs 'mu'/'sigma' or 'arr_0'"):
        evaluate.read_reference(str(path))
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2047))
    with pytest.raises(evaluate.EvalInputError, match=r"\(2047, 2047\), expected"):
        evaluate.read_reference(str(path))


def test_streamed_batches_round_trip(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    np.savez_compressed(path, arr_0=images)
    reader = evaluate.NpzImages(str(path))
    got = np.concatenate(list(reader.batches(4)))
    np.testing.assert_array_equal(got, images)
