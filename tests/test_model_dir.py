"""The common model-directory format (mmfm_jax.models.model_dir) and its strict loader:
round trip, refusals named in one line, and the layouts earlier code wrote (DiTDH's
model.safetensors without a format, "mmfm_jax.rae/1", Inception's "."-joined names)."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from mmfm_jax import rae as rae_lib
from mmfm_jax.models import ditdh, inception, model_dir
from mmfm_jax.models.dinov2 import Dinov2Config
from mmfm_jax.models.rae_decoder import DecoderConfig
from mmfm_jax.models.state_arrays import flat_variables
from mmfm_jax.models.strict_keys import check_keys

DITDH = ditdh.DiTDHConfig(input_size=4, in_channels=3, hidden_size=(32, 48), depth=(1, 1),
                          num_heads=(2, 2), num_classes=5)
RAE = rae_lib.RAEConfig(
    encoder=Dinov2Config(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=4,
                         num_registers=2, grid_size=(4, 4)),
    decoder=DecoderConfig(in_dim=32, hidden_size=24, num_layers=1, num_heads=3, mlp_dim=48,
                          patch_size=4, grid_size=(4, 4)),
    image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.2, 0.3))


def numbered_arrays(module) -> dict[str, np.ndarray]:
    """Every variable of `module` filled with its own index: names are checkable by value."""
    variables = flat_variables(nnx.state(module))
    return {name: np.full(var.shape, i, np.float32) for i, (name, var) in
            enumerate(variables.items())}


def assert_holds(module, arrays):
    loaded = flat_variables(nnx.state(module))
    assert sorted(loaded) == sorted(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(np.asarray(loaded[name][...]), value, err_msg=name)


def write_legacy(directory, config: dict, weights_file: str, arrays: dict, sep: str = "/"):
    """A directory as the code before the common format wrote it."""
    os.makedirs(directory)
    save_file({k.replace("/", sep): v for k, v in arrays.items()},
              os.path.join(directory, weights_file))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return str(directory)


@pytest.fixture(scope="module")
def ditdh_arrays():
    return numbered_arrays(ditdh.abstract_model(DITDH))


def test_write_then_load_round_trip(tmp_path, ditdh_arrays):
    out = str(tmp_path / "m")
    ditdh.save_arrays(DITDH, ditdh_arrays, out)
    assert sorted(os.listdir(out)) == ["config.json", "weights.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        text = f.read()
    config = json.loads(text)
    assert config["format"] == "mmfm_jax.ditdh" and config["format_version"] == 2
    assert text == json.dumps(config, indent=2, sort_keys=True)
    model = ditdh.load_ditdh(out, compute_dtype="bfloat16")
    assert model.config == dataclasses.replace(DITDH, compute_dtype="bfloat16")
    assert_holds(model, ditdh_arrays)


def test_wrong_or_missing_format_is_named(tmp_path, ditdh_arrays):
    out = str(tmp_path / "m")
    ditdh.save_arrays(DITDH, ditdh_arrays, out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    for edit, named in (({"format": "mmfm_jax.rae"}, "format 'mmfm_jax.rae'"),
                        ({"format_version": 3}, "version 3"),
                        ({"format": None}, "format None")):
        with open(path, "w") as f:
            json.dump({**config, **edit}, f)
        with pytest.raises(ValueError, match="expected 'mmfm_jax.ditdh' version 2") as err:
            ditdh.load_ditdh(out)
        assert named in str(err.value) and path in str(err.value)
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="format 'mmfm_jax.ditdh'"):
        rae_lib.load_rae(out)


def test_bad_arrays_are_listed_in_one_line(tmp_path, ditdh_arrays):
    arrays = dict(ditdh_arrays)
    del arrays["blocks/0/attn/proj/bias"]
    arrays["blocks/1/mlp/w3/kernel"] = np.zeros((3, 3), np.float32)
    arrays["extra/table"] = np.zeros((2,), np.float32)
    out = str(tmp_path / "m")
    ditdh.save_arrays(DITDH, arrays, out)
    with pytest.raises(ValueError) as err:
        ditdh.load_ditdh(out)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(os.path.join(out, "weights.safetensors"))
    assert "missing keys: blocks/0/attn/proj/bias (expected shape (32,))" in msg
    assert "blocks/1/mlp/w3/kernel: shape (3, 3), expected (128, 48)" in msg
    assert "unexpected keys: extra/table (2,)" in msg


def test_missing_files_are_value_and_file_not_found_errors(tmp_path, ditdh_arrays):
    with pytest.raises(model_dir.MissingFileError, match="python -m convert inception"):
        inception.load(str(tmp_path))
    out = str(tmp_path / "m")
    ditdh.save_arrays(DITDH, ditdh_arrays, out)
    os.remove(os.path.join(out, "weights.safetensors"))
    with pytest.raises(FileNotFoundError, match="weights.safetensors: missing"):
        ditdh.load_ditdh(out)
    with open(os.path.join(out, "weights.safetensors"), "w") as f:
        f.write("not safetensors")
    with pytest.raises(ValueError, match="weights.safetensors: cannot be read"):
        ditdh.load_ditdh(out)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        model_dir.write(str(tmp_path / "m"), ditdh.MODEL_DIR, {"bad": object()},
                        {"a": np.zeros(2, np.float32)})
    assert os.listdir(tmp_path) == []


def test_legacy_ditdh_directory_loads(tmp_path, ditdh_arrays):
    """save_ditdh before the common format: config.json without a format entry and
    model.safetensors."""
    out = write_legacy(tmp_path / "old", DITDH.to_dict(), "model.safetensors", ditdh_arrays)
    model = ditdh.load_ditdh(out)
    assert model.config == DITDH
    assert_holds(model, ditdh_arrays)


def test_legacy_rae_directory_loads(tmp_path):
    """`python -m convert rae` before the common format: format "mmfm_jax.rae/1"."""
    arrays = numbered_arrays(rae_lib.abstract_rae(RAE))
    config = {"format": "mmfm_jax.rae/1", **dataclasses.asdict(RAE)}
    out = write_legacy(tmp_path / "old", config, "weights.safetensors", arrays)
    model = rae_lib.load_rae(out)
    assert model.cfg == RAE
    assert_holds(model, arrays)


def test_legacy_inception_directory_loads(tmp_path):
    """`python -m convert inception` before the common format: "."-joined names in
    inception.safetensors, format "mmfm_jax.fid_inception.v1"."""
    arrays = numbered_arrays(inception.abstract_model())
    assert "Mixed_5b/branch1x1/kernel" in arrays and len(arrays) == 472
    config = {"format": "mmfm_jax.fid_inception.v1", "source": "x.pth", "num_tensors": 472,
              "num_params": int(sum(a.size for a in arrays.values()))}
    out = write_legacy(tmp_path / "old", config, "inception.safetensors", arrays, sep=".")
    assert_holds(inception.load(out), arrays)


def test_check_keys_ignores_and_accepts_any_shape():
    arrays = {"a": np.zeros((2,)), "b": np.zeros((3, 4)), "skip": np.zeros(1)}
    check_keys({"a": (2,), "b": None}, arrays, "src", ignore=("skip",))
    with pytest.raises(RuntimeError, match=r"src: missing keys: c \| mis-shaped keys: "
                                       r"a: shape \(2,\), expected \(5,\); table"):
        check_keys({"a": (5,), "b": None, "c": None}, arrays, "src", ignore=("skip",),
                   misshaped=["table"], error=RuntimeError)
