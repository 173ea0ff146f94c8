"""The sampling job: per-index determinism across meshes and batches, sources, resume, merge."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from mmfm_jax import parallel, sample_job
from mmfm_jax.gmm import SpatialMixture
from mmfm_jax.models import DiTDHConfig, ditdh
from mmfm_jax.sample_job import Sampler, SampleSpec

SHAPE = (4, 4, 3)
K = 5


def tiny_model(seed=0, **kw):
    """A DiTDH with every variable random (a fresh one outputs zero: adaLN-zero), built from
    host arrays: much faster than eager initialisation, and identical in every process."""
    cfg = DiTDHConfig(input_size=4, in_channels=3, hidden_size=(32, 48), depth=(1, 1),
                      num_heads=(2, 2), num_classes=K, **kw)
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in ditdh.flat_state(ditdh.abstract_model(cfg)).items()}
    return ditdh.model_from_arrays(
        cfg, {k: 0.1 * rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
        source="tiny_model")


def tiny_mixture():
    rng = np.random.default_rng(0)
    weights = np.array([0.05, 0.4, 0.05, 0.3, 0.2], np.float32)
    means = rng.uniform(0.0, 1.0, (K, *SHAPE)).astype(np.float32)
    variances = np.full(K, 0.01, np.float32)
    return SpatialMixture(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(variances))


def decode(z):  # a stand-in decoder with an output range that crosses both clamps
    return z * 0.8 + 0.1


SAMPLE_N = 20  # the multi-process test's job: 3 batches of 8, the last one partly used
SAMPLE_SPEC = SampleSpec(latent_shape=SHAPE, num_steps=6, shift=2.0, conditioning="mode", seed=3)


def job_sampler(mesh):
    """The sampler both the single- and the multi-process tests run."""
    return Sampler(tiny_model(), mesh, SAMPLE_SPEC, batch_size=8, mixture=tiny_mixture(),
                   decode_fn=decode)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def mixture():
    return tiny_mixture()


@pytest.fixture(scope="module")
def spec():
    return SAMPLE_SPEC


@pytest.fixture(scope="module")
def sampler8(model, mixture, spec):
    return Sampler(model, parallel.make_mesh(), spec, batch_size=8, mixture=mixture,
                   decode_fn=decode)


def test_identical_samples_on_8_devices_and_1_device(model, mixture, spec, sampler8):
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    sampler1 = Sampler(model, mesh1, spec, batch_size=16, mixture=mixture, decode_fn=decode)
    rows8 = [sampler8(s) for s in (0, 8)]
    idx8 = np.concatenate([r[0] for r in rows8])
    img8 = np.concatenate([r[1] for r in rows8])
    lab8 = np.concatenate([r[2] for r in rows8])
    idx1, img1, lab1 = sampler1(0)  # other batch size and device count, same indices
    np.testing.assert_array_equal(idx8, np.arange(16))
    np.testing.assert_array_equal(idx1, np.arange(16))
    np.testing.assert_array_equal(img8, img1)
    np.testing.assert_array_equal(lab8, lab1)
    assert img8.dtype == np.uint8 and img8.shape == (16, 4, 4, 3)
    assert len(np.unique(img8.reshape(16, -1), axis=0)) == 16  # samples differ
    assert img8.min() == 0 and img8.max() == 255  # clamped on both sides


def test_generate_matches_a_manual_euler_loop(model, mixture, spec):
    """Modes from the weights, noise from that mode, y = mode, decode, truncation."""
    idx = jnp.arange(10, 14, dtype=jnp.int32)
    images, labels = jax.jit(lambda i: sample_job.generate(model, i, spec, mixture=mixture,
                                                           decode_fn=decode))(idx)
    root = jax.random.key(spec.seed)
    xs, ms = [], []
    for i in range(10, 14):
        k_mode, k_noise, _ = jax.random.split(jax.random.fold_in(root, i), 3)
        m = mixture.sample_modes(k_mode, 1)
        xs.append(mixture.sample(k_noise, m)[0])
        ms.append(int(m[0]))
    x = jnp.stack(xs)
    y = jnp.asarray(ms, jnp.int32)
    grid = np.asarray(sample_job.sampling.euler_grid(spec.num_steps, spec.shift))

    @nnx.jit
    def loop(model, x):
        for a, b in zip(grid[:-1], grid[1:]):
            x = x + (b - a) * model(x, jnp.full((4,), a, jnp.float32), y)
        return x

    want = (np.clip(np.asarray(decode(loop(model, x))), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(labels), ms)
    assert np.abs(np.asarray(images).astype(int) - want.astype(int)).max() <= 1
    assert np.mean(np.asarray(images) == want) > 0.97


def test_modes_follow_the_mixture_weights(mixture):
    spec = SampleSpec(latent_shape=SHAPE, conditioning="mode", seed=0)
    _, labels, y = jax.jit(lambda i: sample_job.draw_sources(spec, i, K, mixture))(
        jnp.arange(4000, dtype=jnp.int32))
    freq = np.bincount(np.asarray(labels), minlength=K) / 4000
    np.testing.assert_allclose(freq, np.asarray(mixture.weights), atol=0.025)
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(y))


def test_unconditional_and_gaussian_sources(mixture):
    idx = jnp.arange(6, dtype=jnp.int32)
    mode = SampleSpec(latent_shape=SHAPE, conditioning="mode")
    uncond = SampleSpec(latent_shape=SHAPE, conditioning="none")
    x_m, l_m, _ = sample_job.draw_sources(mode, idx, K, mixture)
    x_u, l_u, y_u = sample_job.draw_sources(uncond, idx, K, mixture)
    x_g, l_g, y_g = sample_job.draw_sources(uncond, idx, K, None)
    np.testing.assert_array_equal(x_m, x_u)  # the same noise, without the label
    np.testing.assert_array_equal(l_m, l_u)
    np.testing.assert_array_equal(y_u, np.full(6, K))
    np.testing.assert_array_equal(l_g, np.full(6, -1))
    np.testing.assert_array_equal(y_g, np.full(6, K))
    # N(0, I) is the GMM draw with the mode mean removed and unit scale
    eps = (np.asarray(x_m) - np.asarray(mixture.means)[np.asarray(l_m)]) / 0.1
    np.testing.assert_allclose(x_g, eps, atol=2e-5)


def test_guidance_with_guide_equal_to_model_is_plain_sampling(model, mixture):
    base = SampleSpec(latent_shape=SHAPE, num_steps=3, shift=2.0, conditioning="mode")
    idx = jnp.arange(4, dtype=jnp.int32)

    @nnx.jit(static_argnums=1)
    def run(models, spec):
        return sample_job.generate(models[0], idx, spec, mixture=mixture, guide=models[1])[0]

    plain = np.asarray(run((model, None), base))
    ag = SampleSpec(**{**base.__dict__, "guidance": "autoguidance", "scale": 1.5})
    np.testing.assert_array_equal(plain, run((model, model), ag))
    guided = np.asarray(run((model, tiny_model(seed=1)), ag))
    assert np.mean(guided != plain) > 0.5
    cfg1 = SampleSpec(**{**base.__dict__, "guidance": "cfg", "scale": 1.0})
    np.testing.assert_array_equal(plain, run((model, None), cfg1))
    cfg2 = SampleSpec(**{**base.__dict__, "guidance": "cfg", "scale": 2.0})
    assert np.any(np.asarray(run((model, None), cfg2)) != plain)


def test_to_uint8_truncates():
    x = jnp.asarray([-0.5, 0.0, 0.5, 0.999, 1.0, 2.0, 254.9 / 255])
    got = np.asarray(sample_job.to_uint8(x.reshape(1, 1, 7, 1)))[0, 0, :, 0]
    np.testing.assert_array_equal(got, [0, 0, 127, 254, 255, 255, 254])


class Killed(Exception):
    pass


def test_killed_job_resumes_without_duplicates_or_gaps(sampler8, tmp_path):
    n = 21  # not a multiple of the batch: the last batch is partly discarded
    ref = sample_job.run_sampling(sampler8, tmp_path / "ref", n)
    with np.load(ref) as f:
        want, want_labels = f["arr_0"], f["labels"]
    assert want.shape == (n, 4, 4, 3) and want.dtype == np.uint8 and want_labels.shape == (n,)
    assert os.path.exists(tmp_path / "ref" / "grid.png")

    calls = []

    def dies_after_one_batch(start):
        if calls:
            raise Killed
        calls.append(start)
        return sampler8(start)

    killed = _proxy(sampler8, dies_after_one_batch)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        sample_job.run_sampling(killed, out, n)
    assert sorted(os.listdir(out)) == ["shard_0000000_0000008.npz"]
    # a truncated shard from a crash on a non-atomic filesystem is regenerated
    (out / "shard_0000008_0000016.npz").write_bytes(b"PK\x03\x04 truncated")
    run = []
    resumed = _proxy(sampler8, lambda s: run.append(s) or sampler8(s))
    path = sample_job.run_sampling(resumed, out, n)
    assert run == [8, 16]  # the finished batch is not recomputed
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], want)
        np.testing.assert_array_equal(f["labels"], want_labels)
    shards = sample_job.scan_shards(epath.Path(out), remove_bad=False)
    assert [(a, b) for a, b, _ in shards] == [(0, 8), (8, 16), (16, 21)]
    run.clear()
    sample_job.run_sampling(resumed, out, n)  # finished: nothing to do
    assert run == []


def _proxy(sampler, call):
    class Proxy:
        batch_size, local_rows = sampler.batch_size, sampler.local_rows
        __call__ = staticmethod(call)
    return Proxy()


def _shard(d, a, b, value=0):
    sample_job._write_npz(epath.Path(d) / f"shard_{a:07d}_{b:07d}.npz",
                          arr_0=np.full((b - a, 2, 2, 3), value, np.uint8),
                          labels=np.arange(a, b, dtype=np.int32))


def test_merge_refuses_gaps_and_overlaps(tmp_path):
    _shard(tmp_path, 0, 4)
    _shard(tmp_path, 6, 8)
    with pytest.raises(RuntimeError, match="samples 4..5 are missing"):
        sample_job.merge_shards(epath.Path(tmp_path), 8)
    _shard(tmp_path, 3, 6)
    with pytest.raises(RuntimeError, match="already written"):
        sample_job.merge_shards(epath.Path(tmp_path), 8)
    os.remove(tmp_path / "shard_0000003_0000006.npz")
    _shard(tmp_path, 4, 6, value=7)
    with np.load(sample_job.merge_shards(epath.Path(tmp_path), 8)) as f:
        assert f["arr_0"].shape == (8, 2, 2, 3)
        np.testing.assert_array_equal(f["arr_0"][:, 0, 0, 0], [0, 0, 0, 0, 7, 7, 0, 0])
        np.testing.assert_array_equal(f["labels"], np.arange(8))


def test_sample_stage_from_a_model_directory(tmp_path):
    """`--stage=sample` with config.sample.model_path: Gaussian source, demo pixel decoder."""
    from configs.gaussian import get_config
    from mmfm_jax.models import save_ditdh

    save_ditdh(tiny_model(), str(tmp_path / "model"))
    cfg = get_config("demo")
    cfg.sample.model_path = str(tmp_path / "model")
    cfg.sample.num_samples, cfg.sample.batch_size, cfg.sample.num_steps = 12, 8, 3
    mesh = parallel.make_mesh()
    path = sample_job.sample_stage(cfg, str(tmp_path / "work"), mesh)
    assert str(path).endswith("work/samples/samples_12.npz")
    with np.load(path) as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (12, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.full(12, -1))  # Gaussian: no mode
    spec = SampleSpec(latent_shape=SHAPE, num_steps=3, shift=1.0, seed=0)
    want, _ = jax.jit(lambda i: sample_job.generate(
        tiny_model(), i, spec, decode_fn=lambda z: (z + 1) / 2))(jnp.arange(12))
    np.testing.assert_array_equal(images, want)
    assert (tmp_path / "work" / "samples" / "grid.png").exists()
