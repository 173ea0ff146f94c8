"""The train step: schedule, the flow batch (coupling, source, labels), state shardings and
sharding invariance (8 fake devices, data- and FSDP-parallel, equal 1 device)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mode_gmm import get_config
from mmfm_jax import gmm, parallel, train
from mmfm_jax.gmm import CLSMixture, SpatialMixture

K = 10


def tiny_config(**train_overrides):
    cfg = get_config(None)  # demo preset: digits, identity encoder, 10 modes
    cfg.model.hidden_size = (16, 16)
    cfg.model.depth = (1, 1)
    cfg.model.num_heads = (2, 2)
    cfg.model.compute_dtype = "float32"
    cfg.train.batch_size = 16
    cfg.train.label_dropout = 0.1
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


def write_mixtures(directory: str, seed: int = 0) -> tuple[CLSMixture, SpatialMixture]:
    rng = np.random.default_rng(seed)
    weights = np.full(K, 1.0 / K, np.float32)
    cls_mix = CLSMixture(jnp.asarray(weights), jnp.asarray(rng.normal(size=(K, 64)),
                                                           jnp.float32),
                         jnp.asarray(rng.uniform(0.5, 2.0, (K, 64)), jnp.float32))
    spatial = SpatialMixture(jnp.asarray(weights),
                             jnp.asarray(rng.normal(size=(K, 8, 8, 1)), jnp.float32),
                             jnp.asarray(rng.uniform(0.05, 0.5, K), jnp.float32))
    gmm.save_cls(directory, cls_mix)
    gmm.save_spatial(directory, spatial)
    return cls_mix, spatial


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_mixtures(str(d / "gmm"))
    return str(d)


def test_lr_schedule_is_flat_then_linear():
    cfg = tiny_config(lr=2e-4, lr_end=2e-5, lr_decay_start=100, lr_decay_end=300)
    schedule = train.lr_schedule(cfg.train)
    got = [float(schedule(s)) for s in (0, 50, 100, 200, 300, 1000)]
    np.testing.assert_allclose(got, [2e-4, 2e-4, 2e-4, 1.1e-4, 2e-5, 2e-5], rtol=1e-6)


def test_flow_batch_couples_each_image_with_its_mode():
    """Hard assignment with well-separated CLS means: x0 comes from the image's own mode,
    x_t and the target follow the path, dropped labels become the null label."""
    means = jnp.asarray(np.eye(K, 64) * 50.0, jnp.float32)
    cls_mix = CLSMixture(jnp.full((K,), 0.1), means, jnp.ones((K, 64)))
    spatial_means = jnp.arange(K, dtype=jnp.float32)[:, None, None, None] * jnp.ones(
        (K, 8, 8, 1))
    spatial = SpatialMixture(jnp.full((K,), 0.1), spatial_means, jnp.full((K,), 1e-12))
    modes = jnp.asarray([3, 7, 0, 9, 3, 5], jnp.int32)
    x1 = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    cls = means[modes] + 0.1
    opts = train.StepOptions(source="gmm", mode_conditional=True, assignment="hard",
                             time_dist="logit-normal", time_mu=0.0, time_sigma=1.0, shift=2.0,
                             label_dropout=0.0, null_label=K, grad_accum=1, ema_decay=0.9)
    x_t, t, y, target = train.flow_batch(opts, jax.random.key(0), x1, cls, (cls_mix, spatial))
    x0 = spatial_means[modes]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(modes))
    np.testing.assert_allclose(np.asarray(target), np.asarray(x0 - x1), atol=1e-5)
    tb = np.asarray(t)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), (1 - tb) * np.asarray(x1) + tb * np.asarray(x0),
                               atol=1e-5)
    assert np.all((np.asarray(t) >= 0) & (np.asarray(t) <= 1))

    dropped = train.flow_batch(opts.__class__(**{**opts.__dict__, "label_dropout": 1.0}),
                               jax.random.key(0), x1, cls, (cls_mix, spatial))
    np.testing.assert_array_equal(np.asarray(dropped[2]), K)  # null label ...
    np.testing.assert_allclose(np.asarray(dropped[3]), np.asarray(target))  # ... same source

    gauss = opts.__class__(**{**opts.__dict__, "source": "gaussian", "mode_conditional": False})
    x_t, t, y, target = train.flow_batch(gauss, jax.random.key(0), x1, cls, None)
    x0 = np.asarray(target + x1)
    assert abs(x0.mean()) < 0.2 and abs(x0.std() - 1.0) < 0.1  # N(0, I) source
    np.testing.assert_array_equal(np.asarray(y), K)


def _run_steps(cfg, workdir, mesh, batches):
    trainer = train.Trainer.create(cfg, workdir, mesh)
    state = trainer.init()
    check_shardings(trainer, state)
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    check_shardings(trainer, state)
    return losses, jax.device_get(state.params), jax.device_get(state.ema)


def check_shardings(trainer, state):
    """Params, EMA and Adam moments keep the model's logical sharding; EMA starts as a copy."""
    path = ("blocks", 0, "mlp", "w12", "kernel")
    pick = lambda tree: functools.reduce(lambda t, k: t[k], path, tree)
    want = pick(trainer.shardings.params)
    if trainer.mesh.shape["fsdp"] > 1:
        assert "fsdp" in str(want.spec)  # the embed axis is split over fsdp
    for tree in (state.params, state.ema, state.opt_state[1][0].mu, state.opt_state[1][0].nu):
        assert pick(tree).sharding.is_equivalent_to(want, 2)
    if int(state.step) == 0:
        np.testing.assert_array_equal(jax.device_get(pick(state.ema)),
                                      jax.device_get(pick(state.params)))


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
             "label": np.zeros(16, np.int32)} for _ in range(3)]


@pytest.mark.parametrize("mesh_shape,grad_accum", [({"data": 8, "fsdp": 1}, 1),
                                                   ({"data": 4, "fsdp": 2}, 2)])
def test_eight_devices_equal_one(workdir, batches, mesh_shape, grad_accum):
    """Three steps (GMM source, soft assignment, label dropout) on 8 fake devices, data- or
    FSDP-parallel, give the 1-device losses and parameters within float tolerance."""
    cfg = tiny_config(grad_accum=grad_accum)
    one = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    eight = parallel.make_mesh(mesh_shape)
    loss1, params1, ema1 = _run_steps(cfg, workdir, one, batches)
    loss8, params8, ema8 = _run_steps(cfg, workdir, eight, batches)
    assert loss1[0] > 0.1 and loss1[-1] != loss1[0]  # real, changing losses
    np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(ema8), jax.tree.leaves(ema1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_trainer_logs_each_parameter_partition_spec_by_the_config_rules(workdir, caplog):
    """The PartitionSpec table is logged once per trainer, and config.mesh.rules decides it:
    'embed' over fsdp by default, replicated when the run's rules say so."""
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    cfg = tiny_config()
    specs = {}
    for name, rules in (("default", cfg.mesh.rules),
                        ("no_fsdp", tuple((k, None if k == "embed" else v)
                                          for k, v in cfg.mesh.rules))):
        cfg.mesh.rules = rules
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer = train.Trainer.create(cfg, workdir, mesh)
        (table,) = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("parameter shardings")]
        (row,) = [line for line in table.splitlines()
                  if line.split()[0] == "blocks/0/mlp/w12/kernel"]
        specs[name] = row.split(None, 1)[1]
        rows = table.splitlines()[1:]
        assert len(rows) == len(jax.tree.leaves(trainer.shardings.params))
    assert "'fsdp'" in specs["default"] and "fsdp" not in specs["no_fsdp"]
