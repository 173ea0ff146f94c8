"""The memory plan: a known memory model gives a known choice, infeasible requests give one
line, the fit recovers a linear model, and the analytic state follows the applied sharding.

No compiles here (the plan is pure); tests/test_bench.py compiles the tiny model.
"""

import dataclasses

import pytest

from mmfm_jax import memory_plan as mp
from mmfm_jax.models import DiTDHConfig

GIB = mp.GIB


def known_model(**overrides) -> mp.MemoryModel:
    """state(f) = 12 GiB / f, params a quarter of it, 2 GiB overhead, 1 GiB per sample
    without remat and 0.25 GiB with full remat."""
    state = {f: 12 * GIB // f for f in (1, 2, 4, 8)}
    fields = dict(description="known", state=state,
                  params={f: s // 4 for f, s in state.items()}, batch_bytes=2**20,
                  grad_coeff=1.0, overhead={"none": 2.0 * GIB, "full": 2.0 * GIB},
                  per_sample={"none": 1.0 * GIB, "full": 0.25 * GIB})
    fields.update(overrides)
    return mp.MemoryModel(**fields)


def test_prediction_is_the_linear_model():
    m = known_model()
    # fsdp 4, no remat, 8 per device in 2 micro-batches of 4:
    # 3 (state) + 8 MiB (batch) + 2 (overhead) + 0.75 (grads) + 4 x 1 (activations) GiB
    expected = 3 * GIB + 8 * 2**20 + 2 * GIB + 0.75 * GIB + 4 * GIB
    assert m.predict(4, "none", 8, 2) == int(expected)


def test_plan_prefers_no_accumulation_then_no_remat_then_small_fsdp():
    m = known_model()
    kw = dict(global_batch=64, devices=8, margin=1.0)
    # 16 GiB: no remat fits at fsdp 4 (13.8 GiB) but not at fsdp 2 (17.5 GiB).
    best = mp.plan(m, device_memory_bytes=16 * GIB, **kw)
    assert (best.grad_accum, best.remat, best.fsdp, best.data) == (1, "none", 4, 2)
    assert best.micro_batch == best.per_device_batch == 8
    assert best.predicted_bytes == m.predict(4, "none", 8, 1) <= 16 * GIB
    # 10 GiB: no setting without remat fits in one pass; full remat at fsdp 4 (7.8 GiB)
    # comes before accumulating without remat.
    best = mp.plan(m, device_memory_bytes=10 * GIB, **kw)
    assert (best.grad_accum, best.remat, best.fsdp) == (1, "full", 4)
    # Restricted to no remat (a trainer with its remat fixed): accumulation decides.
    best = mp.plan(m, device_memory_bytes=10 * GIB, remats=["none"], **kw)
    assert (best.grad_accum, best.remat, best.fsdp) == (2, "none", 4)
    # The margin leaves headroom: 13.8 GiB of 16 is over 80%.
    best = mp.plan(m, device_memory_bytes=16 * GIB, global_batch=64, devices=8, margin=0.8)
    assert best.predicted_bytes <= 0.8 * 16 * GIB and (best.remat, best.fsdp) != ("none", 4)


def test_candidates_are_ordered_fastest_first():
    options = mp.candidates(known_model(), global_batch=64, devices=8)
    keys = [(o.grad_accum, mp.remat_rank(o.remat), o.fsdp) for o in options]
    assert keys == sorted(keys) and len(options) == 4 * 2 * 4  # accum x remat x fsdp
    assert {o.grad_accum for o in options} == {1, 2, 4, 8}


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch=64, devices=8, device_memory_bytes=2 * GIB), "nothing fits"),
    (dict(global_batch=100, devices=8, device_memory_bytes=80 * GIB), "not divisible"),
    (dict(global_batch=64, devices=8, device_memory_bytes=80 * GIB, remats=["dots_saveable"]),
     "not in the memory model"),
    (dict(global_batch=64, devices=16, device_memory_bytes=80 * GIB), "no state bytes"),
])
def test_infeasible_is_one_line(kwargs, match):
    with pytest.raises(mp.PlanError, match=match) as err:
        mp.plan(known_model(), **kwargs)
    assert "\n" not in str(err.value)


def test_fit_recovers_a_linear_model_and_validates():
    truth = known_model(accum_overhead=0.5 * GIB, accum_coeff=1.5)
    points = [(8, "none", 1, 1), (8, "none", 4, 1), (2, "none", 1, 1), (8, "full", 1, 1),
              (8, "full", 4, 1), (8, "none", 8, 2), (2, "none", 2, 2)]
    checks = [(2, "none", 4, 1), (8, "none", 8, 4), (8, "full", 8, 2)]

    def measure(f, r, b, n):
        return mp.Measurement(f, r, b, n, truth.predict(f, r, b, n), truth.state[f],
                              truth.params[f])

    fitted = mp.fit([measure(*p) for p in points], batch_bytes=truth.batch_bytes,
                    state=truth.state, params=truth.params, description="fit",
                    validation=[measure(*p) for p in checks])
    for name in ("grad_coeff", "accum_coeff"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert fitted.accum_overhead == pytest.approx(truth.accum_overhead, rel=1e-6)
    for r in ("none", "full"):
        assert fitted.per_sample[r] == pytest.approx(truth.per_sample[r], rel=1e-6)
        assert fitted.overhead[r] == pytest.approx(truth.overhead[r], rel=1e-6)
    assert [abs(v["relative_error"]) < 1e-6 for v in fitted.validation] == [True] * 3
    # accumulation costs its own memory: one step more than the same micro-batch alone
    assert fitted.predict(8, "none", 8, 2) > fitted.predict(8, "none", 4, 1) + 4 * 2**20
    again = mp.MemoryModel.from_dict(fitted.to_dict())  # JSON keys become strings
    assert again.predict(4, "full", 8, 2) == fitted.predict(4, "full", 8, 2)


def test_fit_needs_two_batches_and_two_fsdp_sizes():
    m = mp.Measurement(8, "none", 1, 1, 10 * GIB, GIB, GIB // 4)
    with pytest.raises(mp.PlanError, match="two micro-batch sizes"):
        mp.fit([m, m], batch_bytes=0, state={8: GIB}, params={8: GIB // 4}, description="x")
    m4 = dataclasses.replace(m, per_device_batch=4)
    with pytest.raises(mp.PlanError, match="two fsdp sizes"):
        mp.fit([m, m4], batch_bytes=0, state={8: GIB}, params={8: GIB // 4}, description="x")
    m2 = dataclasses.replace(m, fsdp=2)
    accum = dataclasses.replace(m, per_device_batch=8, grad_accum=2)
    with pytest.raises(mp.PlanError, match="accumulation needs compiles at two fsdp"):
        mp.fit([m, m4, m2, accum], batch_bytes=0, state={8: GIB, 2: GIB},
               params={8: GIB // 4, 2: GIB // 4}, description="x")


def test_fit_by_compiling_drives_the_measurements():
    """The orchestration the bench and the trainer share: which compiles it asks for."""
    cfg = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1),
                      num_heads=(2, 3), num_classes=10)
    asked = []

    def measure(f, r, b, n):
        asked.append((f, r, b, n))
        return 10**7 + 10**6 * (b // n) + (5 if r == "none" else 0) * 10**5

    model = mp.fit_by_compiling(measure, cfg, remats=("none", "full"), description="tiny")
    assert asked[:7] == [(8, "none", 1, 1), (8, "none", 4, 1), (8, "full", 1, 1),
                         (8, "full", 4, 1), (2, "none", 1, 1), (8, "none", 8, 2),
                         (2, "none", 2, 2)]
    assert asked[7:] == [(2, "none", 4, 1), (8, "none", 8, 4), (8, "full", 8, 2)]  # held out
    assert model.batch_bytes == 4 * (4 * 4 * 8 + 8)
    assert set(model.state) == {8, 2} and len(model.validation) == 3


def test_state_bytes_follow_the_applied_sharding():
    """params, EMA, mu, nu: 4 bytes a parameter, split over fsdp where it divides the
    annotated dimension, replicated where it does not (as parallel.logical_sharding)."""
    cfg = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1),
                      num_heads=(2, 3), num_classes=10)
    one = mp.state_bytes(cfg, 1, 8)
    n_params = one["params"] // 4
    assert one["total"] == 4 * one["params"] + one["frozen"]
    assert one["ema"] == one["adam_mu"] == one["adam_nu"] == one["params"]
    two = mp.state_bytes(cfg, 2, 8)  # every width (8, 32, 48) is even: all split
    assert two["params"] < one["params"] and two["params"] >= one["params"] // 2
    five = mp.state_bytes(cfg, 5, 5)  # no width divisible by 5: all replicated
    assert five["params"] == one["params"] == 4 * n_params
    state, params = mp.state_tables(cfg, 8, (1, 2))
    assert state == {1: one["total"], 2: two["total"]} and params[2] == two["params"]
    with pytest.raises(mp.PlanError, match="does not divide"):
        mp.state_bytes(cfg, 3, 8)


def test_choose_grad_accum_keeps_the_mesh_and_remat():
    """The trainer's call (config.train.grad_accum=-1): only grad_accum is chosen."""
    cfg = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1),
                      num_heads=(2, 3), num_classes=10)
    state, params = mp.state_tables(cfg, 8, (2,))
    model = known_model(state=state, params=params, overhead={"none": 1e6},
                        per_sample={"none": 1e6}, batch_bytes=0)
    fixed = state[2] + params[2] + 1e6
    # room for exactly 4 samples per micro-batch: 32 per device -> 8 accumulation steps
    memory = fixed + 4.5e6
    best = mp.choose_grad_accum(model, cfg, global_batch=256, devices=8, fsdp=2, remat="none",
                                device_memory_bytes=memory, margin=1.0)
    assert (best.fsdp, best.remat, best.grad_accum, best.micro_batch) == (2, "none", 8, 4)
    with pytest.raises(mp.PlanError, match="nothing fits"):
        mp.choose_grad_accum(model, cfg, global_batch=256, devices=8, fsdp=2, remat="none",
                             device_memory_bytes=fixed, margin=1.0)
