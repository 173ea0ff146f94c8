"""`python -m convert artifacts` on a synthetic release folder (tests/release_fixture.py), and
the conditioning rule of `convert ditdh` (convert/conditioning.py)."""

import contextlib
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from convert.__main__ import main as convert_main
from convert.common import ConversionError
from convert.conditioning import resolve
from mmfm_jax.models import export_torch_state_dict, load_ditdh
from tests.conftest import fixture_path
from tests.release_fixture import convert_argv, shared_release, training_dict

MODELS = [f"dinov2-b/{s}-gmm-{k}" for s in ("uncond", "mode") for k in ("25k", "100k")]
GUIDES = [f"autoguidance/dit-s-{s}-gmm-25k" for s in ("uncond", "mode")]
OUTPUTS = set(MODELS + GUIDES + ["dinov2-b/rae", "dinov2-b/gmm", "inception",
                                 "fid_reference.npz"])


def run_convert(argv) -> tuple[int, str]:
    """convert's CLI with its stdout and stderr captured (module fixtures have no capsys)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = convert_main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return shared_release(tmp_path_factory)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    """One `convert artifacts` call over the whole release, two worker processes."""
    out = str(tmp_path_factory.mktemp("artifacts") / "models")
    rc, log = run_convert(convert_argv(release, out, "--jobs", "2"))
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    return {"rc": rc, "log": log, "out": out, "manifest": manifest}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_one_call_converts_the_whole_release(converted, release):
    assert converted["rc"] == 0, converted["log"]
    outputs = converted["manifest"]["outputs"]
    assert set(outputs) == OUTPUTS
    for name, entry in outputs.items():
        assert os.path.exists(os.path.join(converted["out"], name)), name
        assert entry["sources"], name
        for source in entry["sources"]:
            assert source["size"] == os.path.getsize(source["path"]), name
            assert source["sha256"] == _sha256(source["path"]), name
    assert outputs["dinov2-b/mode-gmm-100k"]["sources"][0]["path"] == os.path.join(
        release["release"], "checkpoints", "dinov2-b", "mode-gmm-100k.pt")
    assert outputs["dinov2-b/gmm"]["settings"] == {
        "encoder": "dinov2-b", "num_components": 6, "latent_shape_chw": [32, 16, 16]}
    assert outputs["dinov2-b/rae"]["settings"]["config"]["encoder"]["hidden_size"] == 32
    assert outputs["fid_reference.npz"]["settings"]["images"] == 8
    log = converted["log"]
    assert "10 converted, 0 up to date" in log and "0 failed" in log
    for absent in ("skip checkpoints/siglip2-b/: absent", "skip checkpoints/mae-b/: absent",
                   "skip gmm/mae-b/: absent"):
        assert absent in log


def test_checkpoint_settings_and_weights(converted, release):
    outputs = converted["manifest"]["outputs"]
    for name in MODELS + GUIDES:
        st = outputs[name]["settings"]
        setting = "mode" if "mode-gmm" in name else "uncond"
        assert st["setting"] == setting and st["weights"] == "ema", name
        assert st["use_y_conditioning"] is (setting == "mode"), name
        assert st["conditioning"] == ("mode" if setting == "mode" else "none"), name
        assert "config_path" in st["conditioning_source"] and "file name" in st[
            "conditioning_source"], name
        assert st["role"] == ("guide" if name.startswith("autoguidance") else "model")
        assert st["num_classes"] == 6 and st["in_channels"] == 32 and st["input_size"] == 16
    assert outputs["dinov2-b/mode-gmm-100k"]["settings"]["hidden_size"] == [32, 48]
    assert outputs["autoguidance/dit-s-mode-gmm-25k"]["settings"]["hidden_size"] == [16, 32]
    assert outputs["dinov2-b/uncond-gmm-25k"]["settings"]["epochs"] == 20
    # the converted weights are the checkpoint's EMA, key for key
    source = os.path.join(release["release"], "checkpoints", "dinov2-b", "mode-gmm-100k.pt")
    ema = torch.load(source, weights_only=True)["ema"]
    exported = export_torch_state_dict(load_ditdh(os.path.join(converted["out"],
                                                               "dinov2-b/mode-gmm-100k")))
    assert list(exported) == list(ema)
    for key, value in ema.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_unconditional_checkpoint_converts_with_conditioning_off(converted):
    import jax.numpy as jnp

    with open(os.path.join(converted["out"], "dinov2-b/uncond-gmm-100k", "config.json")) as f:
        assert json.load(f)["use_y_conditioning"] is False
    with open(os.path.join(converted["out"], "dinov2-b/mode-gmm-100k", "config.json")) as f:
        assert json.load(f)["use_y_conditioning"] is True
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 32)).astype(np.float32)
    x, t, y = jnp.asarray(np.concatenate([x, x])), jnp.asarray([0.3, 0.8] * 2), jnp.asarray(
        [0, 1, 5, 6])  # the same inputs twice, with other labels
    halves = {}
    for name in ("uncond-gmm-100k", "mode-gmm-100k"):
        out = np.asarray(load_ditdh(os.path.join(converted["out"], "dinov2-b", name))(x, t, y))
        halves[name] = out[:2], out[2:]
    a, b = halves["uncond-gmm-100k"]
    np.testing.assert_array_equal(a, b)  # the label table is never read
    a, b = halves["mode-gmm-100k"]
    assert np.abs(a - b).max() > 1e-3  # a mode-conditional model reads y


def _mtimes(out: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in OUTPUTS}


def test_rerun_converts_nothing(converted, release):
    before = _mtimes(converted["out"])
    rc, log = run_convert(convert_argv(release, converted["out"], "--jobs", "2"))
    assert rc == 0, log
    assert "0 converted, 10 up to date" in log and "converting" not in log
    assert _mtimes(converted["out"]) == before
    with open(os.path.join(converted["out"], "manifest.json")) as f:
        assert json.load(f)["outputs"] == converted["manifest"]["outputs"]


def _linked_copy(release: dict, root) -> dict:
    """A copy of the release whose files are hard links (a file replaced in it is new)."""
    src = str(root / "release")
    shutil.copytree(release["release"], src, copy_function=os.link)
    return dict(release, release=src)


def test_changed_source_reconverts_only_its_output(release, tmp_path):
    paths = _linked_copy(release, tmp_path)
    out = str(tmp_path / "models")
    assert run_convert(convert_argv(paths, out, "--jobs", "1"))[0] == 0
    ckpt = os.path.join(paths["release"], "checkpoints", "dinov2-b", "mode-gmm-25k.pt")
    obj = torch.load(ckpt, weights_only=True)
    obj["ema"]["final_layer.linear.bias"] += 1.0
    os.remove(ckpt)
    torch.save(obj, ckpt)  # new content
    stat_path = os.path.join(paths["release"], "normalization_stats", "dinov2-b", "stat.pt")
    data = open(stat_path, "rb").read()
    os.remove(stat_path)
    open(stat_path, "wb").write(data)  # same bytes, new mtime: the hash still matches
    rc, log = run_convert(convert_argv(paths, out, "--jobs", "1"))
    assert rc == 0, log
    assert "1 converted, 9 up to date" in log and "converted dinov2-b/mode-gmm-25k" in log
    model = export_torch_state_dict(load_ditdh(os.path.join(out, "dinov2-b/mode-gmm-25k")))
    np.testing.assert_array_equal(model["final_layer.linear.bias"],
                                  obj["ema"]["final_layer.linear.bias"].numpy())
    rc, log = run_convert(convert_argv(paths, out, "--jobs", "1", "--verify"))
    assert rc == 0 and "0 converted, 10 up to date" in log


def test_errors_name_the_file_and_the_rest_converts(release, tmp_path):
    paths = _linked_copy(release, tmp_path)
    bad = os.path.join(paths["release"], "checkpoints", "dinov2-b", "uncond-gmm-25k.pt")
    os.remove(bad)
    with open(bad, "wb") as f:
        f.write(b"not a checkpoint")
    conflict = os.path.join(paths["release"], "checkpoints", "dinov2-b", "mode-gmm-25k.pt")
    obj = torch.load(conflict, weights_only=True)
    os.remove(conflict)
    torch.save(dict(obj, config_path="configs/DiTDH-XL_DINOv2-B-UNCONDITIONAL-GMM.yaml"),
               conflict)
    out = str(tmp_path / "models")
    rc, log = run_convert(convert_argv(paths, out, "--jobs", "1"))
    assert rc == 1
    errors = [line for line in log.splitlines() if "error:" in line]
    assert any(line.startswith("error: dinov2-b/uncond-gmm-25k: " + bad) for line in errors)
    assert any(line.startswith("error: dinov2-b/mode-gmm-25k: " + conflict)
               and "conflicting conditioning" in line for line in errors)
    assert "2 output(s) failed" in log
    with open(os.path.join(out, "manifest.json")) as f:
        outputs = json.load(f)["outputs"]
    assert set(outputs) == OUTPUTS - {"dinov2-b/uncond-gmm-25k", "dinov2-b/mode-gmm-25k"}


@pytest.mark.parametrize("argv,expect", [
    (["--encoder", "resnet=/x"], "expected NAME=DIR"),
    (["--encoder", "dinov2-b=/nonexistent"], "not a Hugging Face model folder"),
    (["--inception", "/nonexistent.pth"], "--inception /nonexistent.pth: no such file"),
])
def test_bad_arguments_are_one_line(release, tmp_path, argv, expect):
    rc, log = run_convert(["artifacts", "--src", release["release"], "--out",
                           str(tmp_path / "m"), *argv])
    assert rc == 1
    assert expect in log and len(log.strip().splitlines()) == 1, log


# ---------------------------------------------------------------------- conditioning


def test_unknown_conditioning_is_refused_with_one_line(tmp_path, capsys):
    # the fixture training dict: config_path 'configs/example.yaml', no training_cfg
    rc = convert_main(["ditdh", "--ckpt", fixture_path("ditdh", "checkpoint.pt"),
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert fixture_path("ditdh", "checkpoint.pt") in err
    assert "--conditional" in err and "--unconditional" in err and "--params" in err
    assert not (tmp_path / "out").exists()
    rc = convert_main(["ditdh", "--ckpt", fixture_path("ditdh", "checkpoint.pt"),
                       "--out", str(tmp_path / "out"), "--unconditional"])
    assert rc == 0 and "(--unconditional)" in capsys.readouterr().out
    assert load_ditdh(str(tmp_path / "out")).config.use_y_conditioning is False


def _weights():
    return torch.load(fixture_path("ditdh", "checkpoint.pt"), weights_only=True)["ema"]


@pytest.mark.parametrize("name,obj_kind,want,source", [
    ("0100000.pt", "training_cfg", False, "training_cfg use_y_conditioning=False"),
    ("0100000.pt", "gmm_cfg", True, "training_cfg mode_conditional=True"),
    ("0100000.pt", "yaml_mode", True, "MODE-CONDITIONAL"),
    ("uncond-gmm-25k.pt", "raw", False, "file name 'uncond-gmm-25k.pt'"),
    ("dit-s-mode-gmm-25k.pt", "raw", True, "file name 'dit-s-mode-gmm-25k.pt'"),
    ("stage2_model.pt", "raw", True, "raw state dict"),
])
def test_conditioning_sources(name, obj_kind, want, source):
    weights = {"pos_embed": torch.zeros(1)}
    obj = weights if obj_kind == "raw" else training_dict(weights, size="XL", setting="mode",
                                                          steps=1)
    if obj_kind != "raw":
        del obj["config_path"]
    if obj_kind == "training_cfg":
        obj["training_cfg"]["use_y_conditioning"] = False
    elif obj_kind == "gmm_cfg":
        obj["training_cfg"]["gmm"] = {"enabled": True, "mode_conditional": True}
    elif obj_kind == "yaml_mode":
        obj["config_path"] = "configs/DiTDH-S_DINOv2-B-MODE-CONDITIONAL-GMM-8192-DIAG.yaml"
    value, line = resolve(obj, f"/x/{name}")
    assert value is want and source in line


def test_flag_and_params_take_precedence():
    obj = training_dict({}, size="XL", setting="uncond", steps=1)
    value, line = resolve(obj, "/x/uncond-gmm-25k.pt", requested=True)
    assert value is True and "--conditional" in line and "overrides config_path" in line
    value, line = resolve(obj, "/x/uncond-gmm-25k.pt", params={"use_y_conditioning": True})
    assert value is True and "--params" in line
    value, _ = resolve(obj, "/x/uncond-gmm-25k.pt", params={"hidden_size": 1})
    assert value is False  # --params without the key: the file still decides
    with pytest.raises(ConversionError, match="conflicting conditioning"):
        resolve(obj, "/x/mode-gmm-25k.pt")
