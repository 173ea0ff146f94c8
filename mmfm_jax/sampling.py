"""The Euler ODE sampler on the exact upstream grid, and guided velocity functions.

`euler_grid` reproduces RAE's float32 grid bit for bit (REFERENCE.md d.4): torch-style
linspace(0, 0.999, n) with fused products, t = 1 - l, then the time shift in float32.
`euler_sample` runs the whole loop inside one compiled program (`lax.scan`).

`state_dtype=jnp.bfloat16` is MM-FM's `--precision bf16` sampling protocol, the way its
published FIDs were made: torchdiffeq's Euler integrates a bfloat16 state on the float32
grid, and on each step (see `_bf16_step`) casts t to the state's dtype before calling the
model (so t_1 and t_2 of the 50-point grid reach the model as the same time), rounds dt to
bfloat16 (its `dt * f0` is a float32 0-dim tensor times a bfloat16 one), takes the
velocity as the bfloat16 autocast output it is upstream, and adds in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.flow import T_MAX

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: each product-and-add rounded once, symmetric halves."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((float(end32) - float(start32)) / (steps - 1))
    half = steps // 2
    out = np.empty(steps, np.float32)
    for i in range(steps):  # float64 holds float32 products exactly: one rounding per entry
        if i < half:
            out[i] = np.float32(float(start32) + float(step) * i)
        else:
            out[i] = np.float32(float(end32) - float(step) * (steps - 1 - i))
    return out


def euler_grid(num_steps: int, shift: float) -> np.ndarray:
    """`num_steps` float32 times from 1 down to the shifted image of 1 - 0.999."""
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: the Euler grid needs at least 2 points")
    ell = _torch_linspace_f32(0.0, T_MAX, num_steps)
    t = (np.float32(1.0) - ell).astype(np.float32)
    s = np.float32(shift)
    return (s * t / (np.float32(1.0) + (s - np.float32(1.0)) * t)).astype(np.float32)


def model_times(num_steps: int, shift: float, state_dtype=jnp.float32) -> np.ndarray:
    """The `num_steps - 1` float32 times `euler_sample` passes to the velocity function:
    the grid (without its last point), rounded to `state_dtype` as torchdiffeq does."""
    grid = euler_grid(num_steps, shift)[:-1]
    return grid.astype(_state_dtype(state_dtype)).astype(np.float32)


def euler_sample(velocity_fn: VelocityFn, x_noise: jax.Array, *, num_steps: int = 50,
                 shift: float, state_dtype=jnp.float32) -> jax.Array:
    """Integrate dx/dt = v(x, t) from t = 1 over the grid; `num_steps - 1` evaluations.

    Returns the state at the last grid point (no final step to t = 0), as upstream, in
    `state_dtype`: float32 (the default), or bfloat16 for MM-FM's `--precision bf16`
    protocol (module docstring). The velocity function always gets float32 t of shape (B,).
    """
    state_dtype = _state_dtype(state_dtype)
    grid = jnp.asarray(euler_grid(num_steps, shift))
    times = jnp.asarray(model_times(num_steps, shift, state_dtype))
    batch = x_noise.shape[0]
    update = _f32_step if state_dtype == jnp.float32 else _bf16_step

    def step(x, ts):
        t_model, t_cur, t_next = ts
        v = velocity_fn(x, jnp.full((batch,), t_model, jnp.float32))
        return update(x, v, t_next - t_cur), None

    x, _ = jax.lax.scan(step, x_noise.astype(state_dtype), (times, grid[:-1], grid[1:]))
    return x


def _state_dtype(name) -> np.dtype:
    """float32 or bfloat16, given as a dtype or its name (`config.sample.state_dtype`)."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"state_dtype {name!r}: use float32 or bfloat16")
    return dtype


def _f32_step(x: jax.Array, v: jax.Array, dt: jax.Array) -> jax.Array:
    """x + dt v, the product rounded once to the state's dtype (REFERENCE.md d.4)."""
    return x + (dt * v).astype(x.dtype)


def _bf16_step(x: jax.Array, v: jax.Array, dt: jax.Array) -> jax.Array:
    """torchdiffeq's `y0 + dt * f0` with a bfloat16 y0 and f0 and a float32 0-dim dt: dt
    is rounded to bfloat16, the product and the sum are each rounded to bfloat16."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    dt = dt.astype(bf16).astype(f32)
    dy = (dt * v.astype(bf16).astype(f32)).astype(bf16)
    return (x.astype(f32) + dy.astype(f32)).astype(bf16)


def _in_interval(t: jax.Array, interval) -> jax.Array:
    t_min, t_max = (np.float32(v) for v in interval)
    if not t_min < t_max:
        raise ValueError(f"guidance interval {tuple(interval)} needs t_min < t_max")
    return (t >= t_min) & (t <= t_max)  # both ends inclusive, float32 compare


def _bcast(mask: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(mask, (-1,) + (1,) * (like.ndim - 1))


def cfg_velocity(model, y: jax.Array, *, scale: float, interval=(0.0, 1.0),
                 null_label: int | None = None) -> VelocityFn:
    """Classifier-free guidance: v_u + w (v_c - v_u) where t_min <= t <= t_max, else v_c.

    One forward over [x; x] with labels [y; null], as upstream's `forward_with_cfg`.
    """
    null = model.null_label if null_label is None else null_label
    y = jnp.asarray(y)
    y2 = jnp.concatenate([y, jnp.full_like(y, null)])

    def velocity(x, t):
        out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y2)
        v_c, v_u = jnp.split(out, 2)
        guided = v_u + jnp.asarray(scale, v_c.dtype) * (v_c - v_u)
        return jnp.where(_bcast(_in_interval(t, interval), v_c), guided, v_c)
    return velocity


def autoguidance_velocity(model, guide, y: jax.Array, *, scale: float,
                          interval=(0.0, 1.0)) -> VelocityFn:
    """Autoguidance: v_g + w (v - v_g) with the guide seeing the same (x, t, y)."""
    y = jnp.asarray(y)

    def velocity(x, t):
        v = model(x, t, y)
        v_g = guide(x, t, y)
        guided = v_g + jnp.asarray(scale, v.dtype) * (v - v_g)
        return jnp.where(_bcast(_in_interval(t, interval), v), guided, v)
    return velocity


def conditional_velocity(model, y: jax.Array) -> VelocityFn:
    """Plain velocity v(x, t, y) (unconditional models ignore y)."""
    return lambda x, t: model(x, t, y)
