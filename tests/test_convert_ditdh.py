"""`python -m convert ditdh`: loader rule, params files, strict keys, atomic output, export."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import yaml

from convert.__main__ import main as convert_main
from convert.common import ConversionError, load_torch
from convert.ditdh import infer_params, map_state
from mmfm_jax import parallel
from mmfm_jax.models import DiTDHConfig, export_torch_state_dict, load_ditdh, save_ditdh
from mmfm_jax.models.ditdh import abstract_model, count_params, flat_state
from tests.conftest import fixture_path

CKPT = fixture_path("ditdh", "checkpoint.pt")
GUIDE = fixture_path("ditdh", "guide_raw_state_dict.pt")


def _params(name: str) -> dict:
    with open(fixture_path("ditdh", "config.json")) as f:
        return json.load(f)[name]


def _torch_state(path: str, which: str | None = None) -> dict[str, np.ndarray]:
    obj = load_torch(path)
    state = obj[which] if which else obj
    return {k: v.numpy() for k, v in state.items()}


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = convert_main(["ditdh", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def main_params_yaml(tmp_path_factory) -> str:
    """A whole upstream-style config YAML with a stage_2 block."""
    path = tmp_path_factory.mktemp("params") / "DiTDH-tiny.yaml"
    path.write_text(yaml.safe_dump({"stage_1": {"target": "RAE"},
                                    "stage_2": {"target": "DiTwDDTHead",
                                                "params": _params("main")}}))
    return str(path)


def test_convert_ema_by_default_and_export_round_trip(tmp_path, capsys, main_params_yaml):
    out = tmp_path / "main"
    rc, stdout, err = _run(capsys, "--ckpt", CKPT, "--params", main_params_yaml,
                           "--out", str(out))
    assert rc == 0, err
    assert "weights: ema, 58 tensors" in stdout and f"wrote {out}" in stdout
    model = load_ditdh(str(out))
    assert model.config == DiTDHConfig.from_upstream_params(_params("main"))
    exported = export_torch_state_dict(model)
    original = _torch_state(CKPT, "ema")
    assert list(exported) == list(original)  # names and upstream order
    for key, value in original.items():
        assert exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # save_ditdh writes the same format back
    save_ditdh(model, str(tmp_path / "again"))
    again = flat_state(load_ditdh(str(tmp_path / "again")))
    for key, var in flat_state(model).items():
        np.testing.assert_array_equal(np.asarray(again[key][...]), np.asarray(var[...]))


def test_convert_model_weights_on_request(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params("main")))
    rc, stdout, err = _run(capsys, "--ckpt", CKPT, "--params", str(params),
                           "--out", str(tmp_path / "m"), "--weights", "model")
    assert rc == 0, err
    assert "weights: model" in stdout
    exported = export_torch_state_dict(load_ditdh(str(tmp_path / "m")))
    for key, value in _torch_state(CKPT, "model").items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_model_without_ema_is_refused(tmp_path, capsys):
    path = tmp_path / "model_only.pt"
    torch.save({"model": torch.load(CKPT, weights_only=True)["model"], "epoch": 1}, path)
    rc, _, err = _run(capsys, "--ckpt", str(path), "--out", str(tmp_path / "out"))
    assert rc == 1 and "no 'ema'" in err and "--weights model" in err
    assert not (tmp_path / "out").exists()


def test_raw_state_dict_with_prefixes_and_inferred_config(tmp_path, capsys):
    state = torch.load(GUIDE, weights_only=True)
    path = tmp_path / "prefixed.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, path)
    rc, stdout, err = _run(capsys, "--ckpt", str(path), "--out", str(tmp_path / "g"))
    assert rc == 0, err
    assert "weights: raw state dict, 46 tensors" in stdout and "inferred" in stdout
    model = load_ditdh(str(tmp_path / "g"))
    assert model.config == DiTDHConfig.from_upstream_params(_params("guide"))
    exported = export_torch_state_dict(model)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("corruption", ["missing", "misshaped", "unexpected", "code"])
def test_corrupted_checkpoint_is_refused(tmp_path, capsys, corruption, main_params_yaml):
    ckpt = torch.load(CKPT, weights_only=True)
    marker = tmp_path / "pwned"
    if corruption == "missing":
        del ckpt["ema"]["blocks.1.attn.proj.weight"]
        expect = ["missing keys", "blocks.1.attn.proj.weight (expected shape (32, 32))"]
    elif corruption == "misshaped":
        ckpt["ema"]["blocks.2.mlp.w3.weight"] = torch.zeros(48, 127)
        expect = ["mis-shaped", "blocks.2.mlp.w3.weight: shape (48, 127), expected (48, 128)"]
    elif corruption == "unexpected":
        ckpt["ema"]["blocks.3.norm1.weight"] = torch.ones(48)
        expect = ["unexpected keys", "blocks.3.norm1.weight (48,)"]
    else:
        ckpt["ema"] = _RunsCode(str(marker))
        expect = ["refused to unpickle"]
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "--ckpt", str(path), "--params", main_params_yaml,
                      "--out", str(out))
    assert rc == 1
    assert str(path) in err
    for text in expect:
        assert text in err
    assert not out.exists() and not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_params_file_errors_name_the_option(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({**_params("main"), "use_qknorm": True}))
    rc, _, err = _run(capsys, "--ckpt", CKPT, "--params", str(params), "--out",
                      str(tmp_path / "o"))
    assert rc == 1 and "use_qknorm" in err and not (tmp_path / "o").exists()
    params.write_text("just: [a, list]\n")
    rc, _, err = _run(capsys, "--ckpt", CKPT, "--params", str(params), "--out",
                      str(tmp_path / "o"))
    assert rc == 1 and "stage_2.params" in err


@pytest.mark.parametrize("name,trainable,dims", [
    ("ditdh_xl.json", 838_380_628, ([1152, 2048], [28, 2], [16, 16])),
    ("ditdh_s.json", 196_357_204, ([384, 2048], [12, 2], [6, 16])),
])
def test_full_size_key_lists_convert(name, trainable, dims):
    with open(fixture_path("keys", name)) as f:
        shapes = json.load(f)
    zero = np.float32(0)
    state = {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes.items()}  # no memory
    params = infer_params(state, name)
    assert (params["hidden_size"], params["depth"], params["num_heads"]) == dims
    assert params["input_size"] == 16 and params["in_channels"] == 768
    config = DiTDHConfig.from_upstream_params(params)
    arrays = map_state(state, config, name)  # raises unless every key is consumed
    assert len(arrays) == len(shapes)
    model = abstract_model(config)
    assert count_params(model) == trainable
    variables = flat_state(model)
    assert sorted(arrays) == sorted(variables)
    for key, var in variables.items():
        assert tuple(arrays[key].shape) == tuple(var.shape), key
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(int(np.prod(v.shape)) for v in variables.values()) == total


def test_load_sharded_over_fsdp(tmp_path, capsys, main_params_yaml):
    rc, _, err = _run(capsys, "--ckpt", CKPT, "--params", main_params_yaml,
                      "--out", str(tmp_path / "m"))
    assert rc == 0, err
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model = load_ditdh(str(tmp_path / "m"), mesh=mesh, compute_dtype="bfloat16")
    assert model.config.compute_dtype == "bfloat16"
    w12 = model.blocks[0].mlp.w12.kernel[...]
    assert w12.sharding.spec[0] == "fsdp" and len(w12.addressable_shards) == 8
    table = model.y_embedder.embedding_table[...]  # 11 rows x 32: 32 splits over fsdp=4
    assert table.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    exported = export_torch_state_dict(model)  # gathers the shards
    for key, value in _torch_state(CKPT, "ema").items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_ditdh(str(tmp_path))
    with pytest.raises(ConversionError, match="no such file"):
        load_torch(str(tmp_path / "nope.pt"))
