"""Scanned DiTDH blocks (`scan_blocks`): the same model as the unrolled one, in both layouts.

The parity tests of test_ditdh.py and test_sampling.py are rerun here, unchanged, on
scanned models (their `fixture_config` patched to add scan_blocks=True); the rest checks
forward and gradient equality with the unrolled model, every remat policy, conversion and
export through the stacked layout, and model directories of either layout loading into
either model.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from convert.__main__ import main as convert_main
from mmfm_jax import parallel
from mmfm_jax.models import (
    DiTDH,
    DiTDHConfig,
    ditdh,
    export_torch_state_dict,
    load_ditdh,
    save_ditdh,
    scan,
)
from mmfm_jax.models.ditdh import (
    abstract_model,
    block_stacks,
    flat_state,
    from_torch_layout,
    model_from_arrays,
    shard_model,
    state_shardings,
    torch_key_map,
)
from tests import test_ditdh as parity
from tests import test_sampling as sampling_parity
from tests.conftest import fixture_path, load_cases

CKPT = fixture_path("ditdh", "checkpoint.pt")
REMAT_OPTIONS = {False: [True, "dots_saveable"],  # unrolled: nnx.remat per block
                 True: [True, "dots_saveable"]}  # scanned: jax.checkpoint in the scan


@pytest.fixture(autouse=True)
def scanned_fixture_config(monkeypatch):
    """Every parity helper of test_ditdh (and test_sampling, which uses it) builds scanned
    models inside this module's tests."""
    unscanned = parity.fixture_config
    monkeypatch.setattr(parity, "fixture_config",
                        lambda name, **o: unscanned(name, **{"scan_blocks": True, **o}))


@pytest.fixture(scope="module")
def cases():
    return load_cases("ditdh", "cases.npz")


@pytest.fixture(scope="module")
def models():
    return {w: parity.load_fixture_ditdh(w, scan_blocks=True) for w in ("ema", "model", "guide")}


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, x, t, y: m(x, t, y))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _host(model_or_state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_state(model_or_state).items()}


def _unrolled(arrays, config) -> dict[str, np.ndarray]:
    return scan.unstack_arrays(arrays, block_stacks(config))


# ---- the parity tests, unchanged, on scanned models -----------------------------------

def test_parity_helpers_build_scanned_models(models):
    assert all(hasattr(m, "encoder_blocks") and not hasattr(m, "blocks")
               for m in models.values())
    assert parity.load_fixture_ditdh("guide").config.scan_blocks


@pytest.mark.parametrize("which", ["ema", "model"])
def test_scanned_forward_matches_upstream(models, forward, cases, which):
    parity.test_forward_matches_upstream(models, forward, cases, which)


def test_scanned_cfg_and_autoguidance_match_upstream(models, cases):
    parity.test_cfg_matches_upstream(models, cases)
    parity.test_autoguidance_matches_upstream(models, cases)


def test_scanned_fresh_model_and_tables(forward, models):
    fresh = DiTDH(parity.fixture_config("main"), rngs=nnx.Rngs(0))
    parity.test_fresh_model_outputs_exactly_zero(forward, fresh)
    parity.test_fresh_tables_match_upstream_formulas(models, fresh)


def test_scanned_training_step_and_remat(cases):
    parity.test_training_moves_params_only_and_remat_gives_same_step(cases)


def test_scanned_unconditional_ignores_labels(forward, cases):
    parity.test_unconditional_ignores_labels(forward, cases)


def test_scanned_euler_autoguidance_sampling_matches_upstream(cases):
    sampling_parity.test_sample_autoguidance_matches_upstream(cases)


# ---- scanned == unrolled ---------------------------------------------------------------

def _random_arrays(config, seed=0) -> dict[str, np.ndarray]:
    """Unrolled arrays, every one random (a fresh model's zero-init adaLN and final layer
    would hide differences); host numpy, no eager initialisation."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in flat_state(abstract_model(config)).items()}
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


TINY = DiTDHConfig(input_size=4, in_channels=3, hidden_size=(32, 48), depth=(2, 2),
                   num_heads=(2, 4), num_classes=5)


def _tiny_inputs():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    return x, jnp.array([0.3, 0.8]), jnp.array([1, 5])


def test_fresh_scanned_model_is_the_stacked_unrolled_one():
    """Same seed, same weights: scan_blocks is a layout, not a different initialisation."""
    unrolled = _host(DiTDH(TINY, rngs=nnx.Rngs(3)))
    stacked = _host(DiTDH(dataclasses.replace(TINY, scan_blocks=True), rngs=nnx.Rngs(3)))
    assert "encoder_blocks/attn/qkv/kernel" in stacked and "blocks/0/attn/qkv/kernel" in unrolled
    assert stacked["encoder_blocks/attn/qkv/kernel"].shape == (2, 32, 96)
    assert stacked["head_blocks/mlp/w3/kernel"].shape == (2, 128, 48)
    again = _unrolled(stacked, TINY)
    assert sorted(again) == sorted(unrolled)
    for key, value in unrolled.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_scanned_forward_equals_unrolled_forward(forward):
    arrays = _random_arrays(TINY)
    x, t, y = _tiny_inputs()
    out = {}
    for scanned in (False, True):
        model = model_from_arrays(dataclasses.replace(TINY, scan_blocks=scanned), arrays,
                                  source="random")
        out[scanned] = np.asarray(forward(model, x, t, y))
    assert np.abs(out[False]).max() > 0.1
    np.testing.assert_allclose(out[True], out[False], rtol=1e-6, atol=1e-6 *
                               np.abs(out[False]).max())


def _loss_and_grads(config, arrays):
    model = model_from_arrays(config, arrays, source="random")
    x, t, y = _tiny_inputs()
    loss, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean((m(x, t, y) - x) ** 2)))(model)
    grads = _host(grads)
    return float(loss), _unrolled(grads, config) if config.scan_blocks else grads


def _assert_grads_close(grads, ref, what):
    assert sorted(grads) == sorted(ref)
    scale = max(float(np.abs(v).max()) for v in ref.values())
    assert scale > 1e-3
    for key, value in ref.items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def reference_grads():
    """(arrays, loss, grads) of the unrolled model without remat."""
    arrays = _random_arrays(TINY)
    return (arrays, *_loss_and_grads(dataclasses.replace(TINY, remat="none"), arrays))


@pytest.mark.parametrize("scanned", [False, True])
def test_remat_policies_give_the_loss_and_grads_of_none(scanned, reference_grads):
    arrays, ref_loss, ref_grads = reference_grads
    base = dataclasses.replace(TINY, scan_blocks=scanned)
    if scanned:  # the scanned model without remat against the unrolled one
        loss, grads = _loss_and_grads(base, arrays)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        _assert_grads_close(grads, ref_grads, "scanned")
    for remat in REMAT_OPTIONS[scanned]:
        config = dataclasses.replace(base, remat=remat)
        assert config.remat_policy == ("full" if remat is True else remat)
        loss, grads = _loss_and_grads(config, arrays)
        assert loss == pytest.approx(ref_loss, rel=1e-6), remat
        _assert_grads_close(grads, ref_grads, remat)


def test_remat_option_names_and_refusals():
    assert [scan.remat_name(v) for v in (False, True, "none", "full", "True", "false")] == [
        "none", "full", "none", "full", "full", "none"]
    config = dataclasses.replace(TINY, remat="dots_saveable", scan_blocks=True)
    assert DiTDHConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in ("dots", "save_only_these_names", 3):
        with pytest.raises(ValueError, match="remat .*use True/False or one of none, full"):
            dataclasses.replace(TINY, remat=bad)
    with pytest.raises(ValueError, match="scan_blocks needs at least one block"):
        dataclasses.replace(TINY, depth=(2, 0), scan_blocks=True)


def test_scanned_model_shards_over_fsdp_with_the_layers_axis_replicated(models, forward,
                                                                        cases):
    x, t, y = (jnp.concatenate([a, a]) for a in parity._inputs(cases))
    single = np.asarray(forward(models["ema"], x, t, y))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model = shard_model(parity.load_fixture_ditdh("ema"), mesh)
    qkv = model.encoder_blocks.attn.qkv.kernel
    assert qkv.get_metadata()["out_sharding"] == (scan.LAYERS_AXIS, "embed", "qkv")
    assert parallel.logical_to_spec((scan.LAYERS_AXIS, "embed")) == P(None, "fsdp")
    assert qkv[...].sharding.spec == P(None, "fsdp", None)
    assert not qkv[...].is_fully_replicated
    graphdef, state = nnx.split(model)
    batch = parallel.batch_sharding(mesh, 1)
    fn = jax.jit(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y),
                 in_shardings=(state_shardings(state, mesh), parallel.batch_sharding(mesh, 4),
                               batch, batch), out_shardings=parallel.batch_sharding(mesh, 4))
    out = fn(state, *parallel.host_to_global((np.asarray(x), np.asarray(t), np.asarray(y)),
                                             mesh))
    assert parity.max_rel_err(out, single) <= 1e-5


# ---- conversion, export and model directories through the stacked layout --------------

def test_convert_to_stacked_layout_and_export_round_trip(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_read_json(fixture_path("ditdh", "config.json"))["main"]))
    out = tmp_path / "stacked"
    assert convert_main(["ditdh", "--ckpt", CKPT, "--params", str(params), "--out", str(out),
                         "--scan-blocks"]) == 0, capsys.readouterr().err
    names = load_file(str(out / "weights.safetensors"))
    assert "encoder_blocks/attn/qkv/kernel" in names and names[
        "encoder_blocks/attn/qkv/kernel"].shape == (2, 32, 96)
    assert not any(k.startswith("blocks/") for k in names)
    assert _read_json(out / "config.json")["scan_blocks"] is True
    original = {k: v.numpy() for k, v in torch.load(CKPT, weights_only=True)["ema"].items()}
    for scanned in (None, False):  # as stored (stacked), and unrolled on load
        model = load_ditdh(str(out), scan_blocks=scanned)
        assert model.config.scan_blocks is (scanned is None)
        exported = export_torch_state_dict(model)
        assert list(exported) == list(original)
        for key, value in original.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_unrolled_directory_loads_into_a_scanned_model_and_back(tmp_path, forward):
    arrays = _random_arrays(TINY)
    old = str(tmp_path / "old")
    ditdh.save_arrays(TINY, arrays, old)
    cfg_path = os.path.join(old, "config.json")
    config = _read_json(cfg_path)
    del config["scan_blocks"]  # as written before scan_blocks existed
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    x, t, y = _tiny_inputs()
    ref = np.asarray(forward(load_ditdh(old), x, t, y))
    scanned = load_ditdh(old, scan_blocks=True)
    assert scanned.config == dataclasses.replace(TINY, scan_blocks=True)
    np.testing.assert_allclose(np.asarray(forward(scanned, x, t, y)), ref, rtol=1e-6,
                               atol=1e-6 * np.abs(ref).max())
    # saved stacked, then stored unrolled again: the same arrays each way
    save_ditdh(scanned, str(tmp_path / "stacked"))
    assert "head_blocks/norm1/scale" in load_file(str(tmp_path / "stacked" /
                                                      "weights.safetensors"))
    save_ditdh(load_ditdh(str(tmp_path / "stacked")), str(tmp_path / "back"),
               scan_blocks=False)
    back = load_file(str(tmp_path / "back" / "weights.safetensors"))
    assert sorted(back) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert not load_ditdh(str(tmp_path / "back")).config.scan_blocks


def test_bad_arrays_are_named_in_the_stored_layout(tmp_path):
    arrays = _random_arrays(TINY)
    del arrays["blocks/0/attn/proj/bias"]
    arrays["blocks/3/mlp/w3/kernel"] = np.zeros((3, 3), np.float32)
    ditdh.save_arrays(TINY, arrays, str(tmp_path / "unrolled"))
    with pytest.raises(ValueError) as err:
        load_ditdh(str(tmp_path / "unrolled"), scan_blocks=True)
    msg = str(err.value)
    assert "\n" not in msg and "weights.safetensors" in msg
    assert "missing keys: blocks/0/attn/proj/bias (expected shape (32,))" in msg
    assert "blocks/3/mlp/w3/kernel: shape (3, 3), expected (128, 48)" in msg
    stacked = scan.stack_arrays(_random_arrays(TINY), block_stacks(TINY))
    stacked["head_blocks/norm1/scale"] = np.ones((3, 48), np.float32)  # 3 layers, not 2
    ditdh.save_arrays(dataclasses.replace(TINY, scan_blocks=True), stacked,
                      str(tmp_path / "stacked"))
    with pytest.raises(ValueError, match=r"head_blocks/norm1/scale: shape \(3, 48\), "
                                         r"expected \(2, 48\)"):
        load_ditdh(str(tmp_path / "stacked"), scan_blocks=False)


def test_stack_arrays_refuses_a_layer_missing_from_its_stack():
    arrays = _random_arrays(TINY)
    del arrays["blocks/1/norm2/scale"]
    with pytest.raises(ValueError, match=r"encoder_blocks/norm2/scale: cannot stack, "
                                         r"layers \[1\] of 2 missing"):
        scan.stack_arrays(arrays, block_stacks(TINY))


@pytest.mark.parametrize("name", ["ditdh_xl.json", "ditdh_s.json"])
def test_full_size_keys_map_onto_the_stacked_variables(name):
    """Every upstream key of the full-size models lands on one layer of one stacked
    variable with the right shape, and every layer of every variable is hit once
    (shapes only: nothing allocated)."""
    with open(fixture_path("keys", name)) as f:
        shapes = {k: tuple(s) for k, s in json.load(f).items()}
    from convert.ditdh import infer_params

    zero = np.float32(0)
    params = infer_params({k: np.broadcast_to(zero, s) for k, s in shapes.items()}, name)
    config = DiTDHConfig.from_upstream_params(params, scan_blocks=True)
    variables = {k: tuple(v.shape) for k, v in flat_state(abstract_model(config)).items()}
    hits = {}
    specs = torch_key_map(config)
    assert [s.torch_key for s in specs] == [s.torch_key for s in torch_key_map(
        dataclasses.replace(config, scan_blocks=False))]
    for spec in specs:
        assert shapes.pop(spec.torch_key) == spec.torch_shape
        port = from_torch_layout(spec.kind, np.broadcast_to(zero, spec.torch_shape)).shape
        want = variables[spec.path] if spec.layer is None else variables[spec.path][1:]
        assert port == want, spec
        hits.setdefault(spec.path, []).append(spec.layer)
    assert shapes == {}  # every upstream key is mapped
    assert sorted(hits) == sorted(variables)
    for path, layers in hits.items():
        assert layers == ([None] if layers == [None] else list(range(variables[path][0])))


# ---- training -----------------------------------------------------------------------------

@pytest.mark.slow
def test_scanned_training_on_eight_devices_equals_unrolled_on_one(tmp_path):
    """config.model.scan_blocks and .remat through the trainer: two steps of the scanned,
    rematerialised model, FSDP over 8 fake devices, give the losses and parameters of the
    unrolled model on one device."""
    from mmfm_jax import train
    from mmfm_jax.model_parts import model_config
    from tests.test_train import tiny_config, write_mixtures

    write_mixtures(str(tmp_path / "gmm"))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
                "label": np.zeros(16, np.int32)} for _ in range(2)]
    runs = {}
    for scanned, mesh_sizes in ((False, {"data": 1, "fsdp": 1}), (True, {"data": 4, "fsdp": 2})):
        cfg = tiny_config()
        cfg.model.depth = (2, 1)
        cfg.model.scan_blocks, cfg.model.remat = scanned, "dots_saveable" if scanned else False
        devices = jax.devices()[:1] if not scanned else None
        trainer = train.Trainer.create(cfg, str(tmp_path), parallel.make_mesh(mesh_sizes,
                                                                               devices))
        mcfg = model_config(cfg)
        assert (mcfg.scan_blocks, mcfg.remat_policy) == (
            (True, "dots_saveable") if scanned else (False, "none"))
        state, losses = trainer.init(), []
        for batch in batches:
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
        params = {k: np.asarray(v) for k, v in flat_state(jax.device_get(state.params)).items()}
        runs[scanned] = losses, params
    (loss1, params1), (loss8, params8) = runs[False], runs[True]
    np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
    assert any(k.startswith("encoder_blocks/") for k in params8)
    params8 = scan.unstack_arrays(params8, block_stacks(mcfg))
    assert sorted(params8) == sorted(params1)
    for key, value in params1.items():
        np.testing.assert_allclose(params8[key], value, rtol=1e-4, atol=2e-6, err_msg=key)
