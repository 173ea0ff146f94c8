"""Euler sampler parity with upstream's `Sampler.sample_ode('euler')` (fixtures/ditdh)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfm_jax.sampling import (
    autoguidance_velocity,
    conditional_velocity,
    euler_grid,
    euler_sample,
)
from tests.conftest import fixture_path, load_cases, nchw_to_nhwc
from tests.test_ditdh import load_fixture_ditdh, max_rel_err

SAMPLE_RTOL = 5e-4  # max|diff| <= SAMPLE_RTOL * max|ref| after 49 Euler steps


@pytest.fixture(scope="module")
def cases():
    return load_cases("ditdh", "cases.npz")


@pytest.mark.parametrize("resolution", ["256", "512"])
def test_grid_matches_upstream_bit_for_bit(resolution):
    with open(fixture_path("keys", "ode_grid_euler50.json")) as f:
        ref = json.load(f)[resolution]
    grid = euler_grid(50, ref["shift"])
    assert grid.dtype == np.float32
    np.testing.assert_array_equal(grid, np.asarray(ref["grid_float32"], np.float32))


def test_sample_plain_matches_upstream(cases):
    model = load_fixture_ditdh("ema")
    z = jnp.asarray(nchw_to_nhwc(cases["sample_noise"]))
    y = jnp.asarray(cases["sample_y"], jnp.int32)
    shift = float(cases["time_shift"])
    out = jax.jit(lambda z: euler_sample(conditional_velocity(model, y), z, num_steps=50,
                                         shift=shift))(z)
    err = max_rel_err(out, nchw_to_nhwc(cases["sample_plain"]))
    print(f"sample_plain: max|diff|/max|ref| = {err:.2e}")
    assert err <= SAMPLE_RTOL


def test_sample_autoguidance_matches_upstream(cases):
    """Upstream doubles the batch ([z; z], [y; null]) and keeps the first half."""
    model, guide = load_fixture_ditdh("ema"), load_fixture_ditdh("guide")
    z = jnp.asarray(nchw_to_nhwc(cases["sample_noise"]))
    y = jnp.asarray(cases["sample_y"], jnp.int32)
    b = z.shape[0]
    y2 = jnp.concatenate([y, jnp.full_like(y, model.null_label)])
    velocity = autoguidance_velocity(model, guide, y2, scale=1.42, interval=(0.0, 1.0))
    out = jax.jit(lambda z: euler_sample(velocity, jnp.concatenate([z, z]), num_steps=50,
                                         shift=float(cases["time_shift"])))(z)[:b]
    err = max_rel_err(out, nchw_to_nhwc(cases["sample_ag"]))
    print(f"sample_ag: max|diff|/max|ref| = {err:.2e}")
    assert err <= SAMPLE_RTOL
