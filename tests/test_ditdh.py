"""DiTDH parity with the upstream PyTorch model (fixtures/ditdh), guidance, sharding, dtype."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from convert.common import load_torch, to_numpy_state
from convert.ditdh import map_state, select_state
from mmfm_jax import parallel
from mmfm_jax.models import DiTDH, DiTDHConfig, shard_model, state_shardings
from mmfm_jax.models.ditdh import count_params, model_from_arrays
from mmfm_jax.models.layers import Buffer, Frozen
from mmfm_jax.sampling import autoguidance_velocity, cfg_velocity
from tests.conftest import fixture_path, load_cases, nchw_to_nhwc

FWD_RTOL = 2e-5  # max|diff| <= FWD_RTOL * max|ref| at float32, highest precision


def fixture_config(name: str, **overrides) -> DiTDHConfig:
    with open(fixture_path("ditdh", "config.json")) as f:
        return DiTDHConfig.from_upstream_params(json.load(f)[name], **overrides)


def load_fixture_ditdh(which: str, **overrides) -> DiTDH:
    """'ema' / 'model' weights of checkpoint.pt (the main model) or 'guide'."""
    if which == "guide":
        path = fixture_path("ditdh", "guide_raw_state_dict.pt")
        raw, _ = select_state(load_torch(path), path)
        config = fixture_config("guide", **overrides)
    else:
        path = fixture_path("ditdh", "checkpoint.pt")
        raw, _ = select_state(load_torch(path), path, which)
        config = fixture_config("main", **overrides)
    arrays = map_state(to_numpy_state(raw, path), config, path)
    return model_from_arrays(config, arrays, source=path)


def max_rel_err(out, ref) -> float:
    ref = np.asarray(ref)
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def cases():
    return load_cases("ditdh", "cases.npz")


@pytest.fixture(scope="module")
def models():
    return {w: load_fixture_ditdh(w) for w in ("ema", "model", "guide")}


@pytest.fixture(scope="module")
def forward():
    """One jitted forward shared by every test (retraced per model structure only)."""
    return nnx.jit(lambda m, x, t, y: m(x, t, y))


def _inputs(cases, prefix=""):
    x = jnp.asarray(nchw_to_nhwc(cases[f"{prefix}x" if prefix else "x"]))
    t = jnp.asarray(cases[f"{prefix}t" if prefix else "t"], jnp.float32)
    y = jnp.asarray(cases[f"{prefix}y" if prefix else "y"], jnp.int32)
    return x, t, y


@pytest.mark.parametrize("which", ["ema", "model"])
def test_forward_matches_upstream(models, forward, cases, which):
    x, t, y = _inputs(cases)
    ref = nchw_to_nhwc(cases[f"forward_{which}"])
    err = max_rel_err(forward(models[which], x, t, y), ref)
    print(f"forward_{which}: max|diff|/max|ref| = {err:.2e} (max|ref| {np.abs(ref).max():.1f})")
    assert err <= FWD_RTOL


def test_cfg_matches_upstream(models, cases):
    x2, t2, y2 = _inputs(cases, "cfg_")
    b = x2.shape[0] // 2
    assert np.all(np.asarray(y2[b:]) == models["ema"].null_label)
    velocity = cfg_velocity(models["ema"], y2[:b], scale=float(cases["cfg_scale"]),
                            interval=tuple(cases["cfg_interval"]))
    out = jax.jit(velocity)(x2[:b], t2[:b])
    ref = nchw_to_nhwc(cases["forward_cfg"])
    err = max_rel_err(out, ref[:b])
    print(f"forward_cfg: {err:.2e}")
    assert err <= FWD_RTOL
    np.testing.assert_array_equal(ref[:b], ref[b:])  # upstream duplicates the guided half


def test_autoguidance_matches_upstream(models, cases):
    x2, t2, y2 = _inputs(cases, "cfg_")
    velocity = autoguidance_velocity(models["ema"], models["guide"], y2,
                                     scale=float(cases["ag_scale"]),
                                     interval=tuple(cases["ag_interval"]))
    err = max_rel_err(jax.jit(velocity)(x2, t2), nchw_to_nhwc(cases["forward_ag"]))
    print(f"forward_ag: {err:.2e}")
    assert err <= FWD_RTOL


@pytest.fixture(scope="module")
def fresh_model():
    return DiTDH(fixture_config("main"), rngs=nnx.Rngs(0))


def test_fresh_model_outputs_exactly_zero(forward, fresh_model):
    model = fresh_model
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    out = forward(model, x, jnp.array([0.2, 0.9]), jnp.array([3, 10]))
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert float(jnp.max(jnp.abs(out))) == 0.0
    assert sorted(p for p, _ in nnx.to_flat_state(nnx.state(model, Frozen))) == [
        ("pos_embed",), ("t_embedder", "W")]
    assert len(nnx.to_flat_state(nnx.state(model, Buffer))) == 4
    assert count_params(model) == 105_596  # the 58 fixture tensors minus the 6 constants


def test_training_moves_params_only_and_remat_gives_same_step(cases):
    """One SGD step with nnx.Optimizer(wrt=nnx.Param): constants stay, params move, and
    rematerialised blocks give the same update."""
    x, t, y = _inputs(cases)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, t, y) - x) ** 2))(model)
        opt.update(model, grads)
        return loss

    updated = []
    for remat in (False, True):
        model = load_fixture_ditdh("guide", remat=remat)
        before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}
        opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
        loss = step(model, opt)
        after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}
        for key in (("pos_embed",), ("t_embedder", "W"), ("enc_feat_rope", "freqs_cos")):
            np.testing.assert_array_equal(after[key], before[key])
        moved = [k for k in before if not np.array_equal(after[k], before[k])]
        assert len(moved) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        updated.append((float(loss), after))
    assert updated[0][0] == pytest.approx(updated[1][0], rel=1e-6)
    for key, value in updated[0][1].items():
        np.testing.assert_allclose(updated[1][1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_sizes", [{"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_sharded_forward_matches_single_device(models, forward, cases, mesh_sizes):
    x, t, y = (jnp.concatenate([a, a]) for a in _inputs(cases))  # batch 8 = device count
    single = np.asarray(forward(models["ema"], x, t, y))
    mesh = parallel.make_mesh(mesh_sizes)
    model = shard_model(load_fixture_ditdh("ema"), mesh)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    if mesh_sizes["fsdp"] > 1:  # something is really split over fsdp
        qkv = state["blocks"][0]["attn"]["qkv"]["kernel"][...]
        assert qkv.sharding.spec[0] == "fsdp" and not qkv.is_fully_replicated
    batch = parallel.batch_sharding(mesh, 1)
    fn = jax.jit(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y),
                 in_shardings=(shardings, parallel.batch_sharding(mesh, 4), batch, batch),
                 out_shardings=parallel.batch_sharding(mesh, 4))
    out = fn(state, *parallel.host_to_global((np.asarray(x), np.asarray(t), np.asarray(y)),
                                             mesh))
    err = max_rel_err(out, single)
    print(f"{mesh_sizes}: {err:.2e}")
    assert err <= 1e-5  # only reduction order differs


def test_bfloat16_compute_close_to_float32(forward, cases):
    x, t, y = _inputs(cases)
    ref = nchw_to_nhwc(cases["forward_ema"])
    model = load_fixture_ditdh("ema", compute_dtype="bfloat16")
    out = forward(model, x, t, y)
    assert out.dtype == jnp.float32
    assert model.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32  # params stay float32
    diff = np.asarray(out) - ref
    rms = float(np.sqrt(np.mean(diff**2) / np.mean(ref**2)))
    print(f"bfloat16: relative RMS error {rms:.2e}")
    # The fixture's large random adaLN gains amplify bf16 rounding (~7% RMS here; ~0.7% with
    # adaLN weights scaled by 0.1), so only a loose bound is meaningful.
    assert 0 < rms < 0.15


def test_flops_per_sample_counts_matmuls():
    cfg = fixture_config("main")
    # main: N=16, C=8, D=(32,48), L=(2,1), SwiGLU 85/128
    enc = 32 * 6 * 32 + 16 * 32 * 96 + 2 * 16 * 16 * 32 + 16 * 32 * 32 + 16 * 32 * 170 \
        + 16 * 85 * 32
    head = 16 * 48 * 288 + 16 * 48 * 144 + 2 * 16 * 16 * 48 + 16 * 48 * 48 + 16 * 48 * 256 \
        + 16 * 128 * 48
    macs = 16 * 8 * 32 + 16 * 8 * 48 + 512 * 32 + 32 * 32 + 16 * 32 * 48 + 2 * enc + head \
        + 16 * 48 * 96 + 16 * 48 * 8
    assert cfg.flops_per_sample() == 2 * macs


def test_config_round_trip_and_refusals():
    cfg = fixture_config("main", compute_dtype="bfloat16", remat=True)
    assert DiTDHConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.null_label == 10 and cfg.num_label_rows == 11
    with open(fixture_path("ditdh", "config.json")) as f:
        params = json.load(f)["main"]
    with pytest.raises(ValueError, match="cudnn"):
        fixture_config("main", attention_impl="cudnn")
    for key, bad in (("use_qknorm", True), ("patch_size", 2), ("use_swiglu", False),
                     ("wo_shift", True)):
        with pytest.raises(ValueError, match=key):
            DiTDHConfig.from_upstream_params({**params, key: bad})
    no_null = DiTDHConfig.from_upstream_params({**params, "class_dropout_prob": 0.0})
    assert no_null.num_label_rows == 10


def test_unconditional_ignores_labels(forward, cases):
    x, t, y = _inputs(cases)
    model = load_fixture_ditdh("ema", use_y_conditioning=False)
    a = forward(model, x, t, y)
    b = forward(model, x, t, jnp.zeros_like(y))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max_rel_err(a, nchw_to_nhwc(cases["forward_ema"])) > 1e-3  # labels were dropped


def test_fresh_tables_match_upstream_formulas(models, fresh_model):
    """pos_embed and RoPE tables of a fresh model equal those stored by upstream."""
    fresh = fresh_model
    loaded = models["ema"]
    for path in (("pos_embed",), ("enc_feat_rope", "freqs_cos"), ("enc_feat_rope", "freqs_sin"),
                 ("dec_feat_rope", "freqs_cos"), ("dec_feat_rope", "freqs_sin")):
        a, b = (dict(nnx.to_flat_state(nnx.state(m)))[path][...] for m in (fresh, loaded))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                   err_msg=str(path))


def test_torch_reference_matches_fixture(cases):
    """tests/torch_ditdh.py (the benchmark's PyTorch side) reproduces upstream's outputs."""
    import torch

    from benchmarks.torch_ditdh import TorchDiTDH

    with open(fixture_path("ditdh", "config.json")) as f:
        params = json.load(f)["main"]
    state = torch.load(fixture_path("ditdh", "checkpoint.pt"), weights_only=True)["ema"]
    net = TorchDiTDH(params).eval()
    fresh = net.state_dict()
    assert list(fresh) == list(state)  # same names, same order
    for key in ("pos_embed", "enc_feat_rope.freqs_cos", "dec_feat_rope.freqs_sin"):
        torch.testing.assert_close(fresh[key], state[key], rtol=0, atol=1e-6)
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = net(torch.from_numpy(cases["x"]), torch.from_numpy(cases["t"]),
                  torch.from_numpy(cases["y"]))
    err = max_rel_err(out.numpy(), cases["forward_ema"])
    print(f"torch reference forward_ema: {err:.2e}")
    assert err <= FWD_RTOL
