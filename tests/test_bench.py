"""The benchmark CLI: runs on tiny models, writes the JSON fields, FLOP count vs XLA.

No timing assertions: only that the figures exist, are positive and are consistent.
"""

import json

import pytest

from mmfm_jax import bench

FLOPS_RTOL = 0.10  # analytic forward FLOPs (matmuls only) vs XLA's count (everything)
TINY = ["--size", "tiny", "--input-size", "4", "--channels", "8", "--num-classes", "10"]


def _run(tmp_path, name, argv):
    path = tmp_path / f"{name}.json"
    returned = bench.main(argv + ["--json", str(path)])
    with open(path) as f:
        written = json.load(f)
    assert written["benchmark"] == returned["benchmark"] == argv[0]
    return written


def _check_common(result, argv):
    env = result["environment"]
    assert env["device_kind"] and env["num_devices"] == 8  # tests/conftest.py's CPU devices
    for package in ("jax", "jaxlib", "flax", "torch"):
        assert env["versions"][package], package
    assert env["peak_tflops_per_device"] is None  # CPU: no MFU
    assert result["command"].startswith("python -m mmfm_jax.bench " + argv[0])
    assert result["peak_memory_bytes"] > 0 and result["peak_memory_source"] == "host_rss"
    assert result["rows"][0]["name"].startswith("ours") and result["rows"][0]["seconds"] > 0


@pytest.fixture(scope="module")
def train_result(tmp_path_factory):
    argv = ["train", *TINY, "--batch", "8", "--steps", "1", "--warmup", "1", "--vs-torch",
            "--torch-threads", "1"]
    return argv, _run(tmp_path_factory.mktemp("bench"), "train", argv)


def test_train_json(train_result):
    argv, r = train_result
    _check_common(r, argv)
    ours, ref = r["rows"]
    assert ours["name"] == "ours" and ref["name"] == "torch" and ref["batch"] == 8
    assert ours["images_per_sec"] == pytest.approx(8 / ours["seconds"])
    assert ours["tflops_per_device"] > 0 and ours["mfu"] is None
    assert ours["ratio_vs_reference"] == pytest.approx(ref["seconds"] / ours["seconds"])
    settings = r["settings"]
    assert (settings["size"], settings["batch"], settings["dtype"], settings["donate"]) == (
        "tiny", 8, "bfloat16", True)
    flops = r["flops"]
    assert flops["analytic_flops_per_step"] == 3 * 8 * flops["analytic_forward_flops_per_sample"]
    # XLA also counts the optimizer (here on all 8 devices: the params are replicated), the
    # loss and every elementwise op, which a model this tiny makes sizeable; a missing
    # backward (about 1/3) or per-device figures taken as global (1/8) fall far outside.
    assert 1.0 <= flops["step_flops_xla_over_analytic"] < 2.0, flops
    assert r["compiled_memory"]["temp_size_in_bytes"] > 0


def test_forward_flops_match_xla():
    """The analytic count is what MFU divides by: it must be XLA's count of the forward."""
    cfg = bench.DiTDHConfig(input_size=8, in_channels=32, hidden_size=(64, 128), depth=(2, 1),
                            num_heads=(2, 2), num_classes=10)
    check = bench.forward_flops_check(cfg, batch=2)
    print(check)
    assert check["analytic_forward_flops_per_sample"] == cfg.flops_per_sample()
    assert abs(check["forward_flops_xla_over_analytic"] - 1) <= FLOPS_RTOL


def test_sample_json(tmp_path):
    argv = ["sample", *TINY, "--batch", "8", "--steps", "1", "--warmup", "0",
            "--guidance", "autoguidance", "--vs-torch", "--torch-threads", "1",
            "--no-flops-check"]
    r = _run(tmp_path, "sample", argv)
    _check_common(r, argv)
    ours, ref = r["rows"]
    assert (ours["name"], ref["name"]) == ("ours/autoguidance", "torch/autoguidance")
    main, guide = (bench.model_config(size, input_size=4, channels=8, num_classes=10)
                   for size in ("tiny", "tiny_guide"))
    assert ours["flops_per_image"] == 49 * (main.flops_per_sample() + guide.flops_per_sample())
    assert ours["images_per_sec"] == pytest.approx(8 / ours["seconds"])
    assert ours["ratio_vs_reference"] == pytest.approx(ref["seconds"] / ours["seconds"])
    assert r["settings"]["num_steps"] == 50 and r["settings"]["guide_size"] == "tiny_guide"


def test_gmm_json_and_report(tmp_path, train_result, capsys):
    argv = ["gmm", "--n", "2000", "--k", "8", "--d", "16", "--steps", "2", "--vs-sklearn"]
    r = _run(tmp_path, "gmm", argv)
    _check_common(r, argv)
    ours, ref = r["rows"]
    assert ref["name"] == "sklearn"
    # sklearn's time per iteration is a difference of two fits (bench_gmm): no sign check.
    assert ours["ratio_vs_reference"] == pytest.approx(ref["seconds"] / ours["seconds"])
    assert ours["log_likelihood_rel_diff"] < 1e-3  # same EM from the same start
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_result[1]))
    capsys.readouterr()
    bench.main(["report", str(path), str(tmp_path / "gmm.json")])
    table = capsys.readouterr().out
    assert "| train | 8 x cpu (" in table and "| gmm |" in table and "sklearn" in table
    assert train_result[1]["command"] in table


@pytest.mark.slow
def test_train_options_and_auto_batch(tmp_path):
    """FSDP over 2 devices, no donation, remat, float32, XLA attention, batch from XLA's
    memory analysis of a probe compile against a stated memory size."""
    argv = ["train", *TINY, "--batch", "auto", "--probe-batch", "8", "--memory-gb", "0.05",
            "--fsdp", "2", "--no-donate", "--remat", "--dtype", "float32", "--attention", "xla",
            "--steps", "1", "--warmup", "0"]
    r = _run(tmp_path, "train_options", argv)
    _check_common(r, argv)
    s, auto = r["settings"], r["auto_batch"]
    assert (s["fsdp"], s["donate"], s["remat"], s["dtype"], s["attention"]) == (
        2, False, True, "float32", "xla")
    assert s["batch"] % 64 == 0 and s["batch"] >= 64  # multiples of 8 rows on 8 devices
    fixed = (auto["probe_memory"]["argument_size_in_bytes"]
             + auto["probe_memory"]["output_size_in_bytes"]
             - auto["probe_memory"]["alias_size_in_bytes"])
    assert fixed + s["batch"] / 8 * auto["estimated_bytes_per_row"] <= 0.9 * 0.05 * 2**30
    assert r["flops"]["step_flops_xla_over_analytic"] > 1.2  # remat recomputes the forward


@pytest.mark.slow
def test_inception_json(tmp_path):
    argv = ["inception", "--batch", "8", "--steps", "1"]
    r = _run(tmp_path, "inception", argv)
    _check_common(r, argv)
    assert r["rows"][0]["images_per_sec"] > 0
    # XLA counts one device's partition; scaled to the global batch this is the ~5.7
    # GFLOP/image (multiply-adds x 2) of the FID graph at 299x299 on any device count.
    assert 5 < r["gflops_per_image_xla"] < 13
