"""Mixed precision against the float64 truth (issue 13).

Error = rms(out - truth) / rms(truth). DiTDH (fixtures/precision, made by upstream on CPU):
the "bfloat16" policy must be no worse than upstream's torch autocast, forward and 50-point
Euler sample; the bfloat16-state protocol must feed the model upstream's 49 times bit for
bit and land at upstream's error level. The RAE encoder and decoder (fixtures/rae) have no
float64 fixture: their truth is `.double()` of the torch replicas in tests/torch_vit.py
(proved equal to the fixture's float32 outputs), and autocast is the same replicas under
`torch.autocast`. The full-size DiTDH-XL check (random weights, torch float64 truth) is
`-m slow`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.common import load_torch, to_numpy_state
from convert.ditdh import map_state, select_state
from convert.rae import build, read_hf_encoder, read_stats
from mmfm_jax.models.ditdh import DiTDHConfig, model_from_arrays
from mmfm_jax.rae import load_rae, write_rae
from mmfm_jax.sampling import conditional_velocity, euler_sample
from tests.conftest import fixture_path, load_cases, nchw_to_nhwc


def rms_error(out, truth) -> float:
    out, truth = np.asarray(out, np.float64), np.asarray(truth, np.float64)
    assert out.shape == truth.shape, (out.shape, truth.shape)
    return float(np.sqrt(np.mean((out - truth) ** 2) / np.mean(truth ** 2)))


@pytest.fixture(scope="module")
def cases():
    return load_cases("precision", "cases.npz")


@pytest.fixture(scope="module")
def ditdh_state():
    path = fixture_path("precision", "checkpoint.pt")
    raw, _ = select_state(load_torch(path), path, "ema")
    with open(fixture_path("precision", "config.json")) as f:
        params = json.load(f)
    return params, to_numpy_state(raw, path)


def precision_ditdh(ditdh_state, compute_dtype: str):
    params, state = ditdh_state
    config = DiTDHConfig.from_upstream_params(params, compute_dtype=compute_dtype)
    return model_from_arrays(config, map_state(state, config, "precision"), source="precision")


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, x, t, y: m(x, t, y))


def _forward_error(ditdh_state, forward, cases, compute_dtype: str) -> float:
    x = jnp.asarray(nchw_to_nhwc(cases["x"]))
    t, y = jnp.asarray(cases["t"]), jnp.asarray(cases["y"], jnp.int32)
    out = forward(precision_ditdh(ditdh_state, compute_dtype), x, t, y)
    assert out.dtype == jnp.float32
    return rms_error(out, nchw_to_nhwc(cases["forward_f64"]))


def test_float32_forward_at_float32_level(ditdh_state, forward, cases):
    err = _forward_error(ditdh_state, forward, cases, "float32")
    print(f"float32 forward: {err:.2e} (upstream float32 "
          f"{rms_error(cases['forward_f32'], cases['forward_f64']):.2e})")
    assert err < 1e-6


def test_bfloat16_forward_no_worse_than_autocast(ditdh_state, forward, cases):
    autocast = rms_error(cases["forward_bf16_autocast"], cases["forward_f64"])
    policy = _forward_error(ditdh_state, forward, cases, "bfloat16")
    all_bf16 = _forward_error(ditdh_state, forward, cases, "bfloat16_all")
    print(f"forward: autocast {autocast:.2e}, bfloat16 {policy:.2e} (ratio "
          f"{policy / autocast:.2f}), bfloat16_all {all_bf16:.2e} ({all_bf16 / autocast:.2f})")
    assert policy / autocast <= 1.0
    assert policy < all_bf16  # the float32 streams are what buys the precision


def _sample(model, cases, state_dtype, on_time=None):
    z = jnp.asarray(nchw_to_nhwc(cases["sample_noise"]))
    y = jnp.asarray(cases["sample_y"], jnp.int32)
    velocity = conditional_velocity(model, y)
    if on_time is not None:
        def velocity(x, t, inner=velocity):
            jax.debug.callback(on_time, t, ordered=True)
            return inner(x, t)
    run = jax.jit(lambda z: euler_sample(velocity, z, num_steps=50,
                                         shift=float(cases["time_shift"]),
                                         state_dtype=state_dtype))
    return run(z)


def test_euler_sample_float32_state_no_worse_than_autocast(ditdh_state, cases):
    truth = nchw_to_nhwc(cases["sample_f64"])
    autocast = rms_error(nchw_to_nhwc(cases["sample_bf16_autocast_f32_state"]), truth)
    out = _sample(precision_ditdh(ditdh_state, "bfloat16"), cases, jnp.float32)
    assert out.dtype == jnp.float32
    err = rms_error(out, truth)
    print(f"sample, float32 state: autocast {autocast:.2e}, bfloat16 {err:.2e} "
          f"(ratio {err / autocast:.2f})")
    assert err / autocast <= 1.0


def test_bfloat16_state_protocol_matches_upstream(ditdh_state, cases):
    """MM-FM's `--precision bf16`: the model sees upstream's 49 times bit for bit (t_1 and
    t_2 collapse to one bfloat16 value) and the sample lands at upstream's error."""
    times = []
    out = _sample(precision_ditdh(ditdh_state, "bfloat16"), cases, jnp.bfloat16,
                  on_time=lambda t: times.append(np.asarray(t)))
    jax.effects_barrier()
    assert out.dtype == jnp.bfloat16
    seen = np.stack(times)  # (49, B): every row of the batch got the same time
    assert seen.shape == (49, 4) and seen.dtype == np.float32
    want = cases["bf16_state_model_times"]
    np.testing.assert_array_equal(seen.view(np.uint32), np.repeat(want[:, None], 4, 1)
                                  .view(np.uint32))
    truth = nchw_to_nhwc(cases["sample_f64"])
    upstream = rms_error(nchw_to_nhwc(cases["sample_bf16_autocast_bf16_state"]), truth)
    err = rms_error(out, truth)
    print(f"sample, bfloat16 state: upstream {upstream:.2e}, port {err:.2e} "
          f"(ratio {err / upstream:.2f})")
    assert 0.5 <= err / upstream <= 2.0


def test_policies_are_named_and_checked(ditdh_state, forward, cases):
    params, _ = ditdh_state
    config = lambda dtype, **kw: DiTDHConfig.from_upstream_params(params, compute_dtype=dtype,
                                                                  **kw)
    assert (config("bfloat16").dtype, config("bfloat16").stream_dtype) == (jnp.bfloat16,
                                                                           jnp.float32)
    assert config("bfloat16_all").stream_dtype == jnp.bfloat16
    assert config("bfloat16_all", attention_impl="cudnn").attention_impl == "cudnn"
    with pytest.raises(ValueError, match="compute_dtype 'float16'.*bfloat16_all"):
        config("float16")
    # the scanned blocks run the same per-block math (the carry stays a float32 stream)
    x = jnp.asarray(nchw_to_nhwc(cases["x"]))
    t, y = jnp.asarray(cases["t"]), jnp.asarray(cases["y"], jnp.int32)
    outs = []
    for scan in (False, True):
        cfg = config("bfloat16", scan_blocks=scan)
        outs.append(forward(model_from_arrays(cfg, map_state(ditdh_state[1], cfg, "p"),
                                              source="p"), x, t, y))
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=0, atol=1e-6)


def test_state_dtype_refuses_other_dtypes():
    with pytest.raises(ValueError, match="state_dtype"):
        euler_sample(lambda x, t: x, jnp.zeros((1, 2)), shift=1.0, state_dtype=jnp.float16)


# ---------------------------------------------------------------- RAE encoder / decoder


@pytest.fixture(scope="module")
def rae_setup(tmp_path_factory):
    """(RAEConfig, arrays, float32 RAE, bfloat16 RAE) of the converted fixture RAE."""
    hf_config, enc_state, pre = read_hf_encoder(fixture_path("rae", "dinov2_with_registers"))
    with open(fixture_path("rae", "decoder_config", "config.json")) as f:
        upstream = json.load(f)
    cfg, arrays, _ = build(hf_config, enc_state,
                           to_numpy_state(load_torch(fixture_path("rae", "decoder.pt"))),
                           read_stats(fixture_path("rae", "stat.pt")), preprocessor=pre,
                           decoder_upstream=upstream)
    out = str(tmp_path_factory.mktemp("precision_rae") / "rae")
    write_rae(out, cfg, arrays)
    return cfg, arrays, load_rae(out), load_rae(out, compute_dtype="bfloat16")


def _torch_runs(module, x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 truth, float32 and autocast outputs of a torch replica on x."""
    tx = torch.from_numpy(np.array(x, np.float32))  # a writable copy
    with torch.no_grad():
        out = {"f64": module.double()(tx.double()).numpy()}
        module.float()
        out["f32"] = module(tx).double().numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["autocast"] = module(tx).double().numpy()
    return out


@pytest.fixture(scope="module")
def encoder_runs(rae_setup):
    from tests.torch_vit import TorchDinov2

    cfg, arrays, rae32, rae16 = rae_setup
    rae_cases = load_cases("rae", "cases.npz")
    images = np.concatenate([nchw_to_nhwc(rae_cases["images"]),
                             np.random.default_rng(0).random((6, 256, 256, 3), np.float32)])
    pixels = np.asarray(jax.jit(lambda m, x: m.preprocess(x))(rae32, images))
    out = _torch_runs(TorchDinov2(cfg.encoder, arrays), pixels.transpose(0, 3, 1, 2))
    hidden = jax.jit(lambda m, x: m.encoder(x))
    out["port_f32"], out["port_bf16"] = (np.asarray(hidden(m, pixels)) for m in (rae32, rae16))
    out["fixture_f32"] = rae_cases["encoder_last_hidden_state"]
    return out


def test_torch_vit_replicas_match_the_fixture(encoder_runs, rae_setup):
    from tests.torch_vit import TorchDecoder

    assert np.abs(encoder_runs["f32"][:2] - encoder_runs["fixture_f32"]).max() < 2e-5
    cfg, arrays, rae32, _ = rae_setup
    rae_cases = load_cases("rae", "cases.npz")
    out = _decoder_runs(TorchDecoder(cfg.decoder, arrays), rae32, rae_cases)["f32"]
    decoded = out * np.asarray(cfg.image_std) + np.asarray(cfg.image_mean)
    assert np.abs(decoded - nchw_to_nhwc(rae_cases["decoded"])).max() < 1e-5


def test_encoder_bfloat16_no_worse_than_autocast(encoder_runs):
    truth = encoder_runs["f64"]
    for name, sl in (("hidden state", np.s_[:]), ("CLS", np.s_[:, 0])):
        autocast = rms_error(encoder_runs["autocast"][sl], truth[sl])
        port = rms_error(encoder_runs["port_bf16"][sl], truth[sl])
        print(f"encoder {name}: autocast {autocast:.2e}, bfloat16 {port:.2e} "
              f"(ratio {port / autocast:.2f})")
        assert port / autocast <= 1.0
    assert rms_error(encoder_runs["port_f32"], truth) < 1e-6


def _decoder_runs(torch_decoder, rae32, rae_cases) -> dict[str, np.ndarray]:
    """Outputs as (B, H, W, 3) normalised pixels; the input is the fixture's latents."""
    latents = np.asarray(jax.jit(lambda m, z: m.denormalize(z))(
        rae32, nchw_to_nhwc(rae_cases["latents"])))
    b, h, w, c = latents.shape
    out = _torch_runs(torch_decoder, latents.reshape(b, h * w, c))
    p = rae32.cfg.decoder.patch_size
    unpatch = lambda x: (x.reshape(b, h, w, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
                         .reshape(b, h * p, w * p, 3))
    return {k: unpatch(v) for k, v in out.items()} | {"latents": latents}


def test_decoder_bfloat16_no_worse_than_autocast(rae_setup):
    from tests.torch_vit import TorchDecoder

    cfg, arrays, rae32, rae16 = rae_setup
    runs = _decoder_runs(TorchDecoder(cfg.decoder, arrays), rae32, load_cases("rae", "cases.npz"))
    decode = jax.jit(lambda m, z: m.decoder(z))
    autocast = rms_error(runs["autocast"], runs["f64"])
    port = rms_error(decode(rae16, runs["latents"]), runs["f64"])
    print(f"decoder: autocast {autocast:.2e}, bfloat16 {port:.2e} (ratio {port / autocast:.2f})")
    assert port / autocast <= 1.0
    assert rms_error(decode(rae32, runs["latents"]), runs["f64"]) < 1e-6


def test_bfloat16_encoding_keeps_cls_modes(rae_setup):
    """What bfloat16 RAE encoding does to MM-FM's mode assignment: a diagonal GMM fitted
    to float32 CLS tokens of natural-image crops gives (nearly) the same posterior for the
    bfloat16 ones. The measured figures behind config.rae.compute_dtype are in the README."""
    import skimage.data

    from mmfm_jax.gmm import fit_diag_gmm

    _, _, rae32, rae16 = rae_setup
    rng = np.random.default_rng(0)
    sources = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
               skimage.data.rocket()]

    def crop(img):
        side = int(rng.integers(96, min(img.shape[:2]) + 1))
        i, j = (int(rng.integers(0, n - side + 1)) for n in img.shape[:2])
        rows = i + (np.arange(256) * side // 256)
        cols = j + (np.arange(256) * side // 256)
        return img[rows][:, cols].astype(np.float32) / 255

    images = np.stack([crop(sources[k % len(sources)]) for k in range(256)])
    encode = jax.jit(lambda m, x: m.encode(x))
    (lat32, cls32), (lat16, cls16) = (encode(m, images) for m in (rae32, rae16))
    mixture = fit_diag_gmm(np.asarray(cls32), 16, seed=0).mixture
    p32, p16 = (np.asarray(mixture.predict_proba(c), np.float64) for c in (cls32, cls16))
    agreement = float(np.mean(p32.argmax(1) == p16.argmax(1)))
    tv = 0.5 * np.abs(p32 - p16).sum(1)
    print(f"bf16 vs f32 encoding: latents {rms_error(lat16, lat32):.2e}, CLS "
          f"{rms_error(cls16, cls32):.2e}, argmax agreement {agreement:.4f}, TV mean "
          f"{tv.mean():.2e} max {tv.max():.2e}")
    assert 0 < rms_error(lat16, lat32) < 1e-2
    assert agreement >= 0.98 and tv.mean() < 0.02


# ------------------------------------------------------------------- full-size (slow)

XL_PARAMS = dict(input_size=16, in_channels=768, hidden_size=[1152, 2048], depth=[28, 2],
                 num_heads=[16, 16], num_classes=8192, mlp_ratio=4.0, class_dropout_prob=0.1)


def randomize_like_precision_fixture(model: torch.nn.Module, seed: int) -> None:
    """Random weights as fixtures/precision has them: Linear weights and biases N(0, 0.02),
    adaLN and time-MLP N(0, 0.05), norm weights 1 + N(0, 0.1), label table and Fourier W
    N(0, 1); pos-embed and RoPE tables as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "embedding_table" in name or name == "t_embedder.W":
                p.copy_(noise)
            elif "adaLN_modulation" in name or "t_embedder.mlp" in name:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.02 * noise)


@pytest.mark.slow
def test_ditdh_xl_bfloat16_no_worse_than_autocast():
    """DiTDH-XL (28 + 2 blocks, 8192 modes), random weights: the bfloat16 policy's forward
    against torch float64, beside torch autocast (CPU) on the same weights. ~10 GB RAM."""
    from benchmarks.torch_ditdh import TorchDiTDH

    torch_model = TorchDiTDH(XL_PARAMS).eval()
    randomize_like_precision_fixture(torch_model, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 768, 16, 16), generator=g)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([5, 8000])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = torch_model(x, t, y).float().numpy()
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    errors, forward = {}, nnx.jit(lambda m, x, t, y: m(x, t, y))
    with torch.no_grad():
        truth = torch_model.double()(x.double(), t, y).numpy()
    del torch_model  # the float64 copy; `state` keeps the float32 one
    for policy in ("bfloat16", "bfloat16_all"):
        config = DiTDHConfig.from_upstream_params(XL_PARAMS, compute_dtype=policy)
        model = model_from_arrays(config, map_state(state, config, "xl"), source="xl")
        out = forward(model, jnp.asarray(nchw_to_nhwc(x.numpy())), jnp.asarray(t.numpy()),
                      jnp.asarray(y.numpy(), jnp.int32))
        errors[policy] = rms_error(out, nchw_to_nhwc(truth))
        del model
    autocast = rms_error(autocast_out, truth)
    print(f"DiTDH-XL forward: autocast {autocast:.2e}, bfloat16 {errors['bfloat16']:.2e} "
          f"(ratio {errors['bfloat16'] / autocast:.2f}), bfloat16_all "
          f"{errors['bfloat16_all']:.2e} ({errors['bfloat16_all'] / autocast:.2f})")
    assert errors["bfloat16"] / autocast <= 1.0
