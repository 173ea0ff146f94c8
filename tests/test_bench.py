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


# ------------------------------------------------------------- compile, plan, threads

COMPILE_ARGV = ["compile", *TINY, "--batch", "16", "--mesh", "data=2,fsdp=4"]


def test_compile_json_from_abstract_state(tmp_path, monkeypatch):
    """The production step and sampler compile from ShapeDtypeStructs: no state is ever
    initialised, no device array is alive afterwards, and the figures are all there."""
    from mmfm_jax import memory_plan
    from mmfm_jax import train as train_lib

    def no_init(*args, **kwargs):
        raise AssertionError("bench compile must not allocate a train state")

    monkeypatch.setattr(train_lib, "init_state", no_init)
    r = _run(tmp_path, "compile", COMPILE_ARGV)
    assert r["live_array_bytes"] == 0
    train, sample = r["programs"]
    assert (train["program"], sample["program"], sample["batch"]) == ("train", "sample/none", 16)
    for program in (train, sample):
        assert program["lower_seconds"] > 0 and program["compile_seconds"] > 0
        mem = program["memory"]
        assert set(mem) >= {"argument_size_in_bytes", "output_size_in_bytes",
                            "alias_size_in_bytes", "temp_size_in_bytes",
                            "generated_code_size_in_bytes", "peak_bytes_estimate"}
        assert mem["argument_size_in_bytes"] > 0 and mem["temp_size_in_bytes"] > 0
    s = r["settings"]
    assert (s["batch"], s["per_device_batch"], s["mesh"]) == (16, 2, {"data": 2, "fsdp": 4})
    # The analytic state is the sharding the trainer applied, and what the step takes in.
    state = r["analytic_state_per_device"]
    mcfg = bench.model_config("tiny", input_size=4, channels=8, num_classes=10,
                              dtype="bfloat16")
    expected = memory_plan.state_bytes(mcfg, 4, 8)
    parts = ("params", "ema", "adam_mu", "adam_nu", "frozen")
    assert {k: state[k] for k in parts} == {k: expected[k] for k in parts}
    assert 0 <= state["total"] - expected["total"] < 64  # + step, rng and Adam's counts
    # 2 rows per device of float32 latents (the CLS tokens are unused by the Gaussian
    # source, and jit drops unused arguments)
    batch_bytes = 2 * 4 * (4 * 4 * 8)
    mem = train["memory"]
    assert mem["argument_size_in_bytes"] >= state["total"] + batch_bytes
    assert mem["alias_size_in_bytes"] >= state["total"]  # the donated state is reused
    assert mem["argument_size_in_bytes"] - state["total"] - batch_bytes < 4096  # rng, step


def test_compile_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(SystemExit, match="--mesh 'data=2,tp=4'"):
        bench.main(["compile", *TINY, "--mesh", "data=2,tp=4"])
    with pytest.raises(SystemExit, match="needs 16 CPU devices"):
        bench.main(["compile", *TINY, "--mesh", "data=2,fsdp=8"])


def test_plan_from_a_fitted_model(tmp_path, capsys):
    """bench plan reads a fitted model of the same configuration and prints the choice;
    a request nothing satisfies ends in one line."""
    from mmfm_jax import memory_plan
    from mmfm_jax import train as train_lib

    args = bench.build_parser().parse_args(["plan", *TINY])
    cfg = bench.plan_config(args)
    mcfg = train_lib.model_config(cfg)
    state, params = memory_plan.state_tables(mcfg, 8, (1, 2, 4, 8))
    model = memory_plan.MemoryModel(
        description=memory_plan.model_key(args.size, mcfg), state=state, params=params,
        batch_bytes=4 * (4 * 4 * 8 + 8), grad_coeff=1.0, overhead={"none": 1e6, "full": 1e6},
        per_sample={"none": 1e6, "full": 2e5})
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model.to_dict()))
    argv = ["plan", *TINY, "--model-json", str(path), "--global-batch", "64", "--devices",
            "8", "--device-memory", str(8e6 / 2**30), "--margin", "1"]
    r = _run(tmp_path, "plan", argv)
    (row,) = r["rows"]
    assert row["fits"] and row["grad_accum"] == 1 and row["remat"] == "full"
    assert row["predicted_bytes"] <= 8e6
    assert "grad_accum=1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="nothing fits") as err:
        bench.main(argv[:-4] + ["--device-memory", str(1e6 / 2**30)])
    assert "\n" not in str(err.value)


def test_vs_torch_gets_the_threads_xla_uses(tmp_path, train_result):
    """Side by side means the same cores: by default torch runs on as many threads as
    XLA:CPU's pool, and both counts are recorded; --torch-threads overrides."""
    from mmfm_jax import bench_torch

    argv = ["train", *TINY, "--batch", "8", "--steps", "1", "--warmup", "0", "--vs-torch"]
    r = _run(tmp_path, "threads", argv)
    ours, ref = r["rows"]
    cores = bench_torch.xla_cpu_threads()
    assert ours["threads"] == ref["threads"] == cores
    assert r["settings"]["xla_threads"] == r["settings"]["torch_threads"] == cores
    _, fixed = train_result  # --torch-threads 1
    assert fixed["rows"][1]["threads"] == fixed["settings"]["torch_threads"] == 1
    assert fixed["settings"]["xla_threads"] == cores
