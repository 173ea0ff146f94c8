"""FID Inception: converter + Flax network against torch-fidelity's inception-v3-compat
(fixtures/inception), mesh sharding, and the evaluation job end to end."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from convert.__main__ import main as convert_main
from mmfm_jax import evaluate, parallel
from mmfm_jax.models import inception as inception_lib
from tests.conftest import fixture_path, load_cases, nchw_to_nhwc


def recipe_state_dict() -> dict:
    """The fixture's weights, rebuilt with numpy from keys.json's recipe."""
    with open(fixture_path("inception", "keys.json")) as f:
        spec = json.load(f)
    state = {}
    for i, (key, shape) in enumerate(spec["keys"]):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.int64)
            continue
        z = np.random.default_rng([spec["seed"], i]).standard_normal(shape)
        if key.endswith("conv.weight"):
            value = z * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            value = 1 + 0.1 * z
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * z
        elif key.endswith("bn.running_var"):
            value = 1 + 0.1 * np.abs(z)
        elif key == "fc.weight":
            value = z * np.sqrt(1.0 / 2048)
        elif key == "fc.bias":
            value = 0.01 * z
        else:
            raise AssertionError(f"keys.json: no recipe for {key}")
        state[key] = torch.from_numpy(value.astype(np.float32))
    assert len(state) == 566
    return state


def converted_recipe_inception(root) -> str:
    """Save the recipe weights as `root/inception.pth`, convert them with the CLI into
    `root/inception`, and return that directory."""
    from convert.__main__ import main as convert_main

    torch.save(recipe_state_dict(), os.path.join(root, "inception.pth"))
    assert convert_main(["inception", "--weights", os.path.join(root, "inception.pth"),
                         "--out", os.path.join(root, "inception")]) == 0
    return os.path.join(root, "inception")


def convert_cli(weights: str, out: str) -> int:
    """`python -m convert inception --weights W --out D`, in process."""
    return convert_main(["inception", "--weights", weights, "--out", out])


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth")
    torch.save(recipe_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_dir(weights_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "inception")
    assert convert_cli(weights_file, out) == 0
    return out


@pytest.fixture(scope="module")
def net(inception_dir):
    return evaluate.load_inception(inception_dir)  # all 8 fake devices


@pytest.fixture(scope="module")
def cases():
    return load_cases("inception", "cases.npz")


def test_converter_writes_every_tensor(inception_dir):
    with open(os.path.join(inception_dir, inception_lib.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["format"] == inception_lib.FORMAT
    assert config["num_tensors"] == 472  # 566 minus the 94 num_batches_tracked counters
    assert config["num_params"] == 23_885_486 - 94


def test_converter_refuses_wrong_keys(tmp_path, capsys):
    state = recipe_state_dict()
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["Mixed_7c.branch_pool.bn.bias"] = torch.zeros(7)
    state["AuxLogits.fc.weight"] = torch.zeros(3, 3)
    path, out = str(tmp_path / "bad.pth"), str(tmp_path / "out")
    torch.save(state, path)
    assert convert_cli(path, out) == 1
    msg = capsys.readouterr().err
    assert "Mixed_6d.branch1x1.conv.weight (expected shape (192, 768, 1, 1))" in msg
    assert "Mixed_7c.branch_pool.bn.bias: shape (7,), expected (192,)" in msg
    assert "AuxLogits.fc.weight (3, 3)" in msg and path in msg
    assert not os.path.exists(out)


def test_matches_torch_fidelity_fixture(net, cases):
    images = nchw_to_nhwc(cases["images_nchw_uint8"])
    out = net.features(images, intermediates=True)
    for key in ("f64", "f192", "f768", "pool3", "logits_unbiased", "logits"):
        ref = cases[key]
        rel = np.abs(out[key] - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{key}: max error {rel:.2e} relative"
        np.testing.assert_allclose(out[key], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=key)
    assert out["spatial"].shape == (4, 7 * 17 * 17)


def test_resize_is_tf1_legacy_bilinear():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (1, 5, 7, 2)).astype(np.float32)
    got = np.asarray(inception_lib.resize_tf1_bilinear(x, 9))
    want = np.empty((1, 9, 9, 2))
    for i in range(9):  # source = i * in / out, neighbours floor and floor + 1 clamped
        sy = i * 5 / 9
        y0, fy = int(np.floor(sy)), sy - np.floor(sy)
        for j in range(9):
            sx = j * 7 / 9
            x0, fx = int(np.floor(sx)), sx - np.floor(sx)
            p = lambda yy, xx: x[0, min(yy, 4), min(xx, 6)].astype(np.float64)
            top = p(y0, x0) * (1 - fx) + p(y0, x0 + 1) * fx
            bottom = p(y0 + 1, x0) * (1 - fx) + p(y0 + 1, x0 + 1) * fx
            want[0, i, j] = top * (1 - fy) + bottom * fy
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_avg_pool_excludes_padding_like_torch():
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 3)).astype(np.float32)
    got = np.asarray(inception_lib.avg_pool_exclude_pad(x))
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 1, 1,
                                          count_include_pad=False).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_sharded_over_8_devices_equals_one_device(net, cases):
    assert parallel.num_batch_shards(net.mesh) == 8
    images = nchw_to_nhwc(cases["images_nchw_uint8"])
    images = np.concatenate([images, images[:, :, ::-1]])
    single = evaluate.InceptionNet(net.model, parallel.make_mesh(devices=jax.devices()[:1]))
    a = net.features(images, intermediates=True)
    b = single.features(images, intermediates=True)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def write_images_npz(path, images):
    np.savez(path, arr_0=images)
    return str(path)


def test_evaluate_cli_identical_sets(net, inception_dir, cases, tmp_path, capsys):
    images = nchw_to_nhwc(cases["images_nchw_uint8"])
    images = np.concatenate([images, images[:, ::-1], images[:, :, ::-1]])  # 12 images
    samples = write_images_npz(tmp_path / "samples.npz", images)
    out = str(tmp_path / "eval.json")
    rc = evaluate.main(["--samples", samples, "--ref", samples, "--inception", inception_dir,
                        "--out", out, "--batch-size", "8"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "FID" in printed.out and "inception samples: 12/12 img" in printed.err
    with open(out) as f:
        result = json.load(f)
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["num_samples"] == 12 and result["reference"] == os.path.abspath(samples)
    logits = np.concatenate([net.features(images[i:i + 8], pad_to=8)["logits_unbiased"]
                             for i in (0, 8)])  # the job's batch shape: no new compile
    assert result["inception_score"] == pytest.approx(evaluate.inception_score(logits),
                                                      rel=1e-6)


@pytest.mark.slow
def test_evaluate_uses_reference_moments(net, inception_dir, cases, tmp_path):
    """A reference with moments only: FID against them, no precision/recall or sFID."""
    images = nchw_to_nhwc(cases["images_nchw_uint8"])
    images = np.concatenate([images, images[:, ::-1], images[:, :, ::-1]])
    samples = write_images_npz(tmp_path / "samples.npz", images)
    pool3 = net.features(images)["pool3"].astype(np.float64)
    ref = str(tmp_path / "ref_moments.npz")
    np.savez(ref, mu=pool3.mean(0) + 0.5, sigma=np.cov(pool3, rowvar=False))
    result = evaluate.evaluate_samples(samples, ref, inception_dir, batch_size=8)
    assert result["fid"] == pytest.approx(0.25 * 2048, rel=1e-5)
    assert result["sfid"] is None and result["precision"] is None


def test_evaluate_cli_refuses_bad_samples(inception_dir, tmp_path, capsys):
    bad = write_images_npz(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), np.uint8))
    rc = evaluate.main(["--samples", bad, "--ref", bad, "--inception", inception_dir])
    assert rc == 1
    err = capsys.readouterr().err
    assert bad in err and "(2, 3, 8, 8)" in err and "NHWC" in err
