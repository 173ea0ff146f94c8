"""RAE stage 1 (encoder, decoder, latent normalisation, resize) against the upstream
fixtures (fixtures/rae, REFERENCE.md k.2) and against torch's interpolate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.common import load_torch, to_numpy_state
from convert.rae import build, read_hf_encoder, read_stats
from mmfm_jax import parallel
from mmfm_jax.rae import decode_sharded, encode_sharded, load_rae, write_rae
from mmfm_jax.resize import resize_bicubic, resize_bicubic_antialias_np
from tests.conftest import fixture_path, load_cases, nchw_to_nhwc


def _convert(out_dir, stats_file: str) -> str:
    hf_config, enc_state, pre = read_hf_encoder(fixture_path("rae", "dinov2_with_registers"))
    dec_state = to_numpy_state(load_torch(fixture_path("rae", "decoder.pt")))
    with open(fixture_path("rae", "decoder_config", "config.json")) as f:
        upstream = json.load(f)
    cfg, arrays, _ = build(hf_config, enc_state, dec_state,
                        read_stats(fixture_path("rae", stats_file)),
                        preprocessor=pre, decoder_upstream=upstream)
    out_dir.mkdir()
    write_rae(str(out_dir), cfg, arrays)
    return str(out_dir)


@pytest.fixture(scope="module")
def cases():
    return load_cases("rae", "cases.npz")


@pytest.fixture(scope="module")
def rae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rae")
    return {"stat": _convert(root / "stat", "stat.pt"),
            "with_mean": _convert(root / "with_mean", "stat_with_mean.pt")}


@pytest.fixture(scope="module")
def rae(rae_dirs):
    return load_rae(rae_dirs["stat"])


@pytest.fixture(scope="module")
def rae_mean(rae_dirs):
    return load_rae(rae_dirs["with_mean"])


@pytest.fixture(scope="module")
def encoded(rae, cases):
    """One jitted encode of the fixture images: (latents NHWC, cls, hidden state)."""
    def run(model, images):
        hidden = model.encoder(model.preprocess(images))
        return (*model.encode(images), hidden)
    out = jax.jit(run)(rae, nchw_to_nhwc(cases["images"]))
    return tuple(np.asarray(x) for x in out)


def _max_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------ fixtures/rae


def test_encoder_last_hidden_state_matches_fixture(encoded, cases):
    assert _max_err(encoded[2], cases["encoder_last_hidden_state"]) < 2e-5


def test_latents_match_fixture(encoded, cases):
    latents = encoded[0]
    assert latents.shape == (2, 16, 16, 32)  # channels-last
    assert _max_err(latents, nchw_to_nhwc(cases["latents"])) < 2e-5


def test_cls_token_matches_fixture(encoded, cases):
    assert _max_err(encoded[1], cases["cls_token"]) < 1e-5


def test_decoded_matches_fixture(rae, cases):
    decoded = jax.jit(lambda m, z: m.decode(z))(rae, nchw_to_nhwc(cases["latents"]))
    assert _max_err(decoded, nchw_to_nhwc(cases["decoded"])) < 1e-5


def test_stats_with_mean_match_fixture(rae_mean, cases):
    latents, _ = jax.jit(lambda m, x: m.encode(x))(rae_mean, nchw_to_nhwc(cases["images"]))
    assert _max_err(latents, nchw_to_nhwc(cases["latents_with_mean"])) < 2e-5
    # decoded_with_mean decodes the same `latents` (not latents_with_mean)
    decoded = jax.jit(lambda m, z: m.decode(z))(rae_mean, nchw_to_nhwc(cases["latents"]))
    assert _max_err(decoded, nchw_to_nhwc(cases["decoded_with_mean"])) < 1e-5


def test_stats_stored_channels_last(rae):
    var = read_stats(fixture_path("rae", "stat.pt"))["var"]
    np.testing.assert_array_equal(np.asarray(rae.latent_var[...]), var.transpose(1, 2, 0))
    assert rae.latent_mean is None


def test_encode_accepts_encoder_sized_images(rae, cases, encoded):
    """224x224 input skips the resize (the GMM scripts' centre crops)."""
    x224 = np.asarray(resize_bicubic(nchw_to_nhwc(cases["images"]), 224))
    latents = jax.jit(lambda m, x: m.encode(x)[0])(rae, x224)
    assert _max_err(latents, encoded[0]) < 1e-6


def test_bfloat16_compute_is_close(rae_dirs, rae, cases, encoded):
    rae_bf16 = load_rae(rae_dirs["stat"], compute_dtype="bfloat16")
    latents, cls = jax.jit(lambda m, x: m.encode(x))(rae_bf16, nchw_to_nhwc(cases["images"]))
    assert latents.dtype == jnp.float32
    rel = np.abs(np.asarray(latents) - encoded[0]).max() / np.abs(encoded[0]).max()
    assert 0 < rel < 0.05
    decode = jax.jit(lambda m, z: m.decode(z))
    assert _max_err(decode(rae_bf16, encoded[0]), decode(rae, encoded[0])) < 0.05


# -------------------------------------------------------------------------- sharding


def test_sharded_encode_decode_equals_single_device(rae_dirs, rae, cases):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    sharded = load_rae(rae_dirs["stat"], mesh=mesh)
    kernel = sharded.encoder.layers[0].fc1.kernel[...]
    assert "fsdp" in str(kernel.sharding.spec)  # width axis sharded by its logical name
    rng = np.random.default_rng(0)
    images = np.concatenate([nchw_to_nhwc(cases["images"]),
                             rng.random((8, 256, 256, 3), dtype=np.float32)])  # 10 rows
    latents, cls = encode_sharded(sharded, images, mesh=mesh, batch_size=8)  # 8 + 2 padded
    ref_latents, ref_cls = jax.jit(lambda m, x: m.encode(x))(rae, images)
    assert latents.shape == (10, 16, 16, 32) and cls.shape == (10, 32)
    assert _max_err(latents, ref_latents) < 1e-5
    assert _max_err(cls, ref_cls) < 1e-5
    decoded = decode_sharded(sharded, latents, mesh=mesh, batch_size=8)
    assert _max_err(decoded, jax.jit(lambda m, z: m.decode(z))(rae, latents)) < 1e-5


# ----------------------------------------------------------------------------- resize


def _torch_resize(x_nhwc, size, antialias=False):
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))
    out = torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False,
                                          antialias=antialias)
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape,size", [((2, 256, 256, 3), 224), ((1, 256, 200, 3), (224, 96)),
                                        ((1, 40, 52, 2), (64, 70))])
def test_resize_matches_torch_bicubic(shape, size):
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    ours = jax.jit(resize_bicubic, static_argnums=1)(x, size)
    err = _max_err(ours, _torch_resize(x, size))
    assert err < 1e-6, err
    # jax.image.resize is a different filter: the test can tell them apart
    other = jax.image.resize(x, (shape[0], *ours.shape[1:3], shape[3]), "bicubic")
    assert _max_err(other, _torch_resize(x, size)) > 1e-2


@pytest.mark.parametrize("grid,size", [(37, (16, 16)), (37, (32, 32)), (37, (20, 45))])
def test_antialias_resize_matches_torch(grid, size):
    x = np.random.default_rng(2).standard_normal((grid, grid, 8)).astype(np.float32)
    ours = resize_bicubic_antialias_np(x, size)
    err = _max_err(ours, _torch_resize(x[None], size, antialias=True)[0])
    assert err < 1e-6, err
