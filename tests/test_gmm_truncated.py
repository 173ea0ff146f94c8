"""The truncated M-step against the dense one: same fit to float32 rounding over 20
iterations, and every certificate (per row, per block, per mode) checked by data built to
fail it, with the fallback it triggers still giving the dense result."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmfm_jax import parallel
from mmfm_jax.gmm import em, fit_diag_gmm
from mmfm_jax.gmm.em import _flat_rows_update


def _planted(n, k, d, seed, spread, offset=5.0, scales=(0.5, 1.5)):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (k, d))
    scales = rng.uniform(*scales, (k, d))
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.normal(0, 1, (n, d)) * scales[labels] + offset
    return x.astype(np.float32), centres + offset


def _init(x, k, seed, var=1.0):
    """Means at random rows (sklearn's 'random_from_data'), unit variances."""
    rng = np.random.default_rng(seed)
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    return np.full(k, 1.0 / k), means, np.full(means.shape, var)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _assert_same_fit(trunc, dense, rtol=1e-5):
    errs = {f: _rel(getattr(trunc, f), getattr(dense, f)) for f in ("weights", "variances")}
    means = np.asarray(dense.means, np.float64)  # relative to the largest |mean| of the mode
    errs["means"] = float(np.max(np.abs(np.asarray(trunc.means) - means).max(1)
                                 / np.abs(means).max(1)))
    errs["history"] = _rel(trunc.history, dense.history)
    errs["log_likelihood"] = abs(trunc.log_likelihood / dense.log_likelihood - 1)
    print({f: f"{e:.1e}" for f, e in errs.items()})
    assert max(errs.values()) < rtol, errs


@pytest.mark.parametrize("screen", [False, True], ids=["float32_estep", "bf16_screen"])
def test_truncated_equals_dense_over_20_iterations(screen):
    """24 modes in D 64 that overlap a little (spread 1), init near the planted centres: most
    rows are peaked, a few are flat and take the sparse flat-row path. The float32 noise
    floor (two dense fits that differ only in block size) is printed and checked to sit
    well below the 1e-5 tolerance, so the comparison can see a truncation error. With the
    bf16 screen, the rows it cannot certify are recomputed (some, not most)."""
    x, centres = _planted(4000, 24, 64, seed=0, spread=1.0, scales=(0.8, 1.2))
    rng = np.random.default_rng(1)
    init = (np.full(24, 1 / 24), centres + rng.normal(0, 0.1, centres.shape),
            np.ones(centres.shape))
    kwargs = dict(max_iter=20, tol=0.0, init=init, chunk_size=1024)
    trunc = fit_diag_gmm(x, 24, block_rows=256, screen=screen, **kwargs)
    dense = fit_diag_gmm(x, 24, truncate=False, block_rows=256, **kwargs)
    other_blocks = fit_diag_gmm(x, 24, truncate=False, block_rows=128, **kwargs)
    assert trunc.n_iter == dense.n_iter == 20
    print("float32 noise floor:", end=" ")
    _assert_same_fit(other_blocks, dense, rtol=5e-6)
    _assert_same_fit(trunc, dense)
    info = trunc.truncation
    print(info[0], info[-1])
    assert all(i["pending_blocks"] == i["repaired_modes"] == 0 for i in info)
    assert all(i["m_step"] == ("screened" if screen else "truncated") for i in info)
    recomputed = [i["recomputed_rows"] for i in info]
    assert all(0 < r < 0.1 * len(x) for r in recomputed) if screen else not any(recomputed)
    assert all(0 < i["flat_rows"] < 0.01 * len(x) for i in info)  # the row bound was hit
    assert all(0 < i["dropped_mass"] < 1e-7 * len(x) for i in info)  # mass really dropped


def test_mostly_flat_rows_are_recomputed_then_the_m_step_goes_dense():
    """Heavily overlapping modes: most rows are flat, every block is beyond the sparse path
    and sets its flat rows aside for the chunk's dense recomputation; after such a pass
    the next iterations run the dense M-step. The fit is the dense one."""
    x, _ = _planted(1500, 6, 4, seed=2, spread=0.3)
    init = _init(x, 6, seed=3)
    kwargs = dict(max_iter=8, tol=0.0, init=init, chunk_size=512, block_rows=128)
    trunc = fit_diag_gmm(x, 6, screen=False, **kwargs)
    dense = fit_diag_gmm(x, 6, truncate=False, **kwargs)
    first, *later = trunc.truncation
    print(first, later[-1])
    assert first["pending_blocks"] == 12 and first["flat_rows"] > 750  # of 1500 rows
    assert first["m_step"] == "truncated" and all(i["m_step"] == "dense" for i in later)
    _assert_same_fit(trunc, dense)


@pytest.mark.parametrize("planted", [(30,), (30, 20, 25)], ids=["one_block", "three_blocks"])
def test_blocks_with_too_many_flat_rows_for_the_pairs_are_set_aside(planted):
    """Flat rows planted in blocks of 128 rows, 20-30 per block (more than the sparse
    path's block / 64 = 2): those blocks set their flat rows aside for the chunk's dense
    recomputation, and the statistics are the dense ones."""
    x, centres = _planted(1024, 8, 16, seed=7, spread=3.0)
    between = (centres[0] + centres[1]) / 2  # equidistant from two modes: flat
    rng = np.random.default_rng(8)
    for block, rows in enumerate(planted):
        start = 40 + 256 * block
        x[start:start + rows] = between + rng.normal(0, 0.05, (rows, 16))
    init = (np.full(8, 1 / 8), centres, np.ones(centres.shape))
    kwargs = dict(max_iter=1, tol=0.0, init=init, chunk_size=1024, block_rows=128)
    trunc = fit_diag_gmm(x, 8, screen=False, **kwargs)
    dense = fit_diag_gmm(x, 8, truncate=False, **kwargs)
    info = trunc.truncation[0]
    print(info)
    assert info["pending_blocks"] == len(planted)
    _assert_same_fit(trunc, dense)


@pytest.mark.parametrize("screen", [False, True], ids=["float32_estep", "bf16_screen"])
def test_mode_fed_only_by_dropped_mass_is_repaired(monkeypatch, screen):
    """A broad, light mode that every row gives a responsibility far below 1e-7: each row
    passes the per-row bound, yet that mode's N_k is all dropped mass, so the per-mode
    certificate fails and the repair pass recomputes it exactly. With the repair disabled
    the same fit is visibly wrong: the certificate, not luck, keeps it exact."""
    x, centres = _planted(2000, 5, 8, seed=4, spread=4.0)
    w = np.full(6, 0.999999 / 5)
    w[5] = 1e-6
    means = np.concatenate([centres, x.mean(0, keepdims=True)]).astype(np.float64)
    variances = np.concatenate([np.ones((5, 8)), np.full((1, 8), 16.0)])
    kwargs = dict(max_iter=1, tol=0.0, init=(w, means, variances), chunk_size=1024)
    trunc = fit_diag_gmm(x, 6, screen=screen, **kwargs)
    dense = fit_diag_gmm(x, 6, truncate=False, **kwargs)
    print(trunc.truncation)
    assert trunc.truncation[0]["repaired_modes"] >= 1
    _assert_same_fit(trunc, dense)
    monkeypatch.setattr(em, "_repair", lambda data, terms, modes, lses, stats, nk: (stats, nk))
    unrepaired = fit_diag_gmm(x, 6, screen=screen, **kwargs)
    assert _rel(unrepaired.means[5], dense.means[5]) > 1e-4  # 10x the tolerance


def test_row_certificate_counts_what_is_dropped():
    """`_flat_rows_update` directly: a flat row whose other modes exceed the kept-entries
    budget is reported as failing; a row that fits keeps its non-negligible modes exactly
    and reports the rest as dropped mass."""
    block, k = 256, 80
    others = np.zeros((block, k), np.float32)
    others[3, :] = 0.5  # flat row, 80 modes of equal weight: over the budget of 4 x 4
    others[7, [1, 2]] = [0.25, 1e-12]  # flat row: keeps mode 1, drops mode 2 (1e-12)
    rest = others.sum(1)
    scale = 1.0 / (1.0 + rest)
    weighted = np.ones((block, 6), np.float32) * scale[:, None]
    args = lambda rows: (jnp.asarray(others), jnp.asarray(weighted), jnp.asarray(scale),
                         jnp.asarray(rest), jnp.asarray(np.isin(np.arange(block), rows)), 1e-7)
    *_, ok = _flat_rows_update(*args([3, 7]))
    assert not bool(ok)
    cols, rows, dropped, ok = _flat_rows_update(*args([7]))
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(rows)[np.asarray(cols) == 1].sum(0),
                               0.25 * scale[7] * np.ones(6), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dropped)[2], 1e-12 * scale[7], rtol=1e-6)
    assert np.asarray(dropped)[np.arange(k) != 2].max() == 0


@pytest.mark.parametrize("screen", [False, True], ids=["float32_estep", "bf16_screen"])
@pytest.mark.parametrize("stream", [False, True], ids=["resident", "streamed"])
def test_truncated_sharded_equals_single_device(stream, screen):
    x, _ = _planted(1003, 10, 12, seed=5, spread=1.0)
    init = _init(x, 10, seed=6)
    kwargs = dict(max_iter=5, tol=0.0, init=init, chunk_size=256, block_rows=64, screen=screen)
    base = fit_diag_gmm(x, 10, **kwargs)
    fit = fit_diag_gmm(x, 10, mesh=parallel.make_mesh(), stream=stream, **kwargs)
    _assert_same_fit(fit, base)


def test_the_screen_backs_off_after_passes_that_recompute_most_rows():
    """`_next_mode`: a screened pass recomputing over a quarter of its rows is followed by
    2^f unscreened ones (f failures in a row, at most 16) before the screen tries again;
    a pass with most rows flat is followed by a dense one."""
    n = 100
    good = dict(m_step="screened", recomputed_rows=3, flat_rows=0)
    bad = dict(good, recomputed_rows=90)
    unscreened = dict(good, m_step="truncated", recomputed_rows=0)
    assert em._next_mode(True, True, [], n) == "screened"
    assert em._next_mode(True, True, [bad], n) == "truncated"
    assert em._next_mode(True, True, [bad, unscreened], n) == "truncated"
    assert em._next_mode(True, True, [bad] + [unscreened] * 2, n) == "screened"  # waited 2
    twice = [bad, unscreened, unscreened, bad]  # two failures in a row: wait 4
    assert em._next_mode(True, True, twice + [unscreened] * 3, n) == "truncated"
    assert em._next_mode(True, True, twice + [unscreened] * 4, n) == "screened"
    assert em._next_mode(True, True, [bad] * 3 + [good], n) == "screened"
    assert em._next_mode(True, True, [good], n) == "screened"
    assert em._next_mode(True, False, [], n) == "truncated"
    assert em._next_mode(True, True, [dict(good, flat_rows=60)], n) == "dense"
    assert em._next_mode(False, True, [], n) == "dense"
