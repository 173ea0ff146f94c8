"""Flow-matching pieces against upstream (fixtures/ditdh cases.npz loss_*), time sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax.flow import (
    default_shift,
    drop_labels,
    interpolate,
    per_sample_loss,
    sample_time,
    shift_time,
)
from tests.conftest import load_cases, nchw_to_nhwc
from tests.test_ditdh import FWD_RTOL, load_fixture_ditdh, max_rel_err


@pytest.fixture(scope="module")
def cases():
    return load_cases("ditdh", "cases.npz")


def test_default_shift_is_sqrt48():
    assert default_shift(16, 16, 768) == float(np.sqrt(48.0))


def test_shift_time_bit_exact(cases):
    assert float(cases["time_shift"]) == default_shift(16, 16, 768)
    out = np.asarray(shift_time(cases["loss_t_raw"], float(cases["time_shift"])))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, cases["loss_t_shifted"])


def test_interpolate_and_target(cases):
    x0, x1 = (jnp.asarray(nchw_to_nhwc(cases[k])) for k in ("loss_x0", "loss_x1"))
    xt, ut = interpolate(jnp.asarray(cases["loss_t_shifted"]), x0, x1)
    np.testing.assert_allclose(xt, nchw_to_nhwc(cases["loss_xt"]), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ut, nchw_to_nhwc(cases["loss_ut"]), rtol=0, atol=1e-7)


def test_model_prediction_and_per_sample_loss(cases):
    model = load_fixture_ditdh("model")
    xt = jnp.asarray(nchw_to_nhwc(cases["loss_xt"]))
    t = jnp.asarray(cases["loss_t_shifted"])
    y = jnp.asarray(cases["y"], jnp.int32)
    pred = nnx.jit(lambda m, x, t, y: m(x, t, y))(model, xt, t, y)
    err = max_rel_err(pred, nchw_to_nhwc(cases["loss_pred"]))
    print(f"loss_pred: max|diff|/max|ref| = {err:.2e}")
    assert err <= FWD_RTOL
    loss = per_sample_loss(pred, jnp.asarray(nchw_to_nhwc(cases["loss_ut"])))
    print(f"loss_per_sample: {np.asarray(loss)} vs {cases['loss_per_sample']}")
    np.testing.assert_allclose(loss, cases["loss_per_sample"], rtol=1e-5)


def test_logit_normal_time_distribution():
    t = sample_time(jax.random.key(0), 200_000)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 0.999
    # logit-normal(0, 1): median 0.5; after the sqrt(48) shift the mean is ~0.837
    assert abs(float(jnp.median(t)) - 0.5) < 0.01
    assert abs(float(jnp.mean(shift_time(t, np.sqrt(48.0)))) - 0.837) < 0.005
    u = sample_time(jax.random.key(1), 100_000, dist="uniform")
    assert float(u.max()) < 0.999 and abs(float(u.mean()) - 0.4995) < 0.005


def test_drop_labels_rate_and_null():
    y = jnp.zeros((100_000,), jnp.int32)
    dropped = drop_labels(jax.random.key(0), y, 0.1, 1000)
    assert set(np.unique(np.asarray(dropped)).tolist()) == {0, 1000}
    assert abs(float(jnp.mean(dropped == 1000)) - 0.1) < 0.005
    assert drop_labels(jax.random.key(0), y, 0.0, 1000) is y
