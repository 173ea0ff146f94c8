"""`python -m convert rae`: strict key mapping (fixture and real key lists), refusals that
name the key and leave nothing behind, the released statistics file."""

import json
import os

import numpy as np
import pytest
import torch

from convert.__main__ import main as convert_main
from convert.common import ConversionError, load_torch
from convert.rae import build, read_stats
from mmfm_jax.rae import expected_shapes, load_rae
from tests.conftest import fixture_path

# The published config of facebook/dinov2-with-registers-base (REFERENCE.md b.1, b.6).
DINOV2_B_WREG_CONFIG = {
    "model_type": "dinov2_with_registers", "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "mlp_ratio": 4.0, "patch_size": 14, "image_size": 518,
    "num_register_tokens": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
    "qkv_bias": True, "use_swiglu_ffn": False, "num_channels": 3}


def _args(out, decoder=None, stats="stat.pt", extra=()):
    rae = fixture_path("rae")
    return ["rae", "--encoder", os.path.join(rae, "dinov2_with_registers"),
            "--decoder", decoder or os.path.join(rae, "decoder.pt"),
            "--stats", os.path.join(rae, stats), "--out", str(out),
            "--decoder-config", os.path.join(rae, "decoder_config", "config.json"), *extra]


def _placeholders(key_file: str) -> dict[str, np.ndarray]:
    """Shape-only stand-ins for a real state dict: zero-strided views, no memory."""
    with open(fixture_path("keys", key_file)) as f:
        shapes = json.load(f)
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes.items()}


def _n(shape) -> int:
    return int(np.prod(shape))


def test_cli_converts_fixture_and_reports(tmp_path, capsys):
    out = tmp_path / "rae"
    assert convert_main(_args(out)) == 0
    printed = capsys.readouterr().out
    assert "dropped embeddings.mask_token, layernorm.bias, layernorm.weight;" in printed
    assert "wrote" in printed and "82 arrays" in printed
    assert sorted(os.listdir(out)) == ["config.json", "weights.safetensors"]
    rae = load_rae(str(out))
    assert rae.cfg.decoder.num_heads == 3 and rae.cfg.decoder.layer_norm_eps == 1e-12
    assert rae.cfg.encoder.grid_size == (16, 16) and rae.image_size == (256, 256)
    # the precomputed table equals torch's antialiased bicubic resize of the 37x37 grid
    from safetensors import safe_open
    with safe_open(fixture_path("rae", "dinov2_with_registers", "model.safetensors"),
                   framework="pt") as f:
        table = f.get_tensor("embeddings.position_embeddings")
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic",
                                          align_corners=False, antialias=True)
    ref = torch.cat([table[0, :1], ref[0].permute(1, 2, 0).reshape(256, -1)]).numpy()
    assert np.abs(np.asarray(rae.encoder.pos_embed[...]) - ref).max() < 1e-7


def test_full_rae_state_dict_with_decoder_prefix(tmp_path):
    decoder = load_torch(fixture_path("rae", "decoder.pt"))
    full = {f"decoder.{k}": v for k, v in decoder.items()}
    full["encoder.encoder.embeddings.cls_token"] = torch.zeros(1, 1, 32)
    torch.save(full, tmp_path / "full.pt")
    assert convert_main(_args(tmp_path / "a", decoder=str(tmp_path / "full.pt"))) == 0
    assert convert_main(_args(tmp_path / "b")) == 0
    a = load_rae(str(tmp_path / "a")).decoder.layers[1].fc2.kernel[...]
    b = load_rae(str(tmp_path / "b")).decoder.layers[1].fc2.kernel[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("edit,named", [
    ("drop", ["missing keys: decoder_layers.1.output.dense.bias (expected shape (48,))"]),
    ("rename", ["missing keys: decoder_norm.weight", "unexpected keys: decoder_norm.gamma"]),
    ("reshape", ["decoder_pred.bias: shape (767,), expected (768,)"]),
])
def test_bad_decoder_is_refused_and_leaves_nothing(tmp_path, capsys, edit, named):
    state = load_torch(fixture_path("rae", "decoder.pt"))
    if edit == "drop":
        del state["decoder_layers.1.output.dense.bias"]
    elif edit == "rename":
        state["decoder_norm.gamma"] = state.pop("decoder_norm.weight")
    else:
        state["decoder_pred.bias"] = state["decoder_pred.bias"][:767]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    assert convert_main(_args(out, decoder=str(bad))) == 1
    err = capsys.readouterr().err
    for text in named:
        assert text in err
    assert str(bad) in err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]  # no output, no temporary folder


def test_decoder_heads_must_be_known(tmp_path, capsys):
    args = _args(tmp_path / "out")
    args = args[:args.index("--decoder-config")]
    assert convert_main(args) == 1
    assert "--decoder-config or --decoder-heads" in capsys.readouterr().err
    assert convert_main(args + ["--decoder-heads", "3"]) == 0


def test_stats_of_wrong_shape_are_refused(tmp_path, capsys):
    torch.save({"mean": None, "var": torch.ones(32, 8, 8)}, tmp_path / "s.pt")
    args = _args(tmp_path / "out")
    args[args.index("--stats") + 1] = str(tmp_path / "s.pt")
    assert convert_main(args) == 1
    assert "'var' has shape (32, 8, 8), expected (32, 16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_statistics_file_loads():
    stats = read_stats(fixture_path("real", "dinov2_b_wreg_imagenet256_stat.pt"))
    assert stats["mean"] is None
    var = stats["var"]
    assert var.shape == (768, 16, 16) and var.dtype == np.float32
    assert abs(var.min() - 0.005325) < 1e-6 and abs(var.max() - 9.1278) < 1e-4
    assert abs(var.mean() - 0.775034) < 1e-5


def test_real_key_lists_map_completely():
    """The released DINOv2-B and ViT-XL decoder key lists map onto the model with every
    key consumed and every shape right, without materialising the weights."""
    encoder = _placeholders("dinov2_wreg_base.json")
    decoder = _placeholders("decoder_vitxl.json")
    assert (len(encoder), len(decoder)) == (224, 456)
    stats = read_stats(fixture_path("real", "dinov2_b_wreg_imagenet256_stat.pt"))
    cfg, arrays, dropped = build(DINOV2_B_WREG_CONFIG, encoder, decoder, stats)
    assert (cfg.decoder.hidden_size, cfg.decoder.num_layers, cfg.decoder.num_heads,
            cfg.decoder.mlp_dim, cfg.decoder.patch_size) == (1152, 28, 16, 4096, 16)
    assert cfg.encoder.input_size == (224, 224) and not cfg.has_latent_mean
    assert dropped == ["embeddings.mask_token", "layernorm.weight", "layernorm.bias"]
    assert {k: tuple(v.shape) for k, v in arrays.items()} == expected_shapes(cfg)
    assert len(arrays) == (224 - 3) + 456 + 1
    enc_total = sum(_n(v.shape) for k, v in arrays.items() if k.startswith("encoder/"))
    dec_total = sum(_n(v.shape) for k, v in arrays.items() if k.startswith("decoder/"))
    # HF total minus mask_token, final LN and the 37x37 -> 16x16 table difference
    assert enc_total == 86_583_552 - 768 - 1536 - (1370 - 257) * 768
    assert dec_total == 415_352_704
    assert arrays["encoder/pos_embed"].shape == (257, 768)

    del decoder["decoder_layers.27.attention.attention.key.weight"]
    with pytest.raises(ConversionError, match=r"decoder_layers\.27\.attention\.attention"
                                              r"\.key\.weight \(expected shape"):
        build(DINOV2_B_WREG_CONFIG, encoder, decoder, stats)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Fixture-style random weights: LN weights 1 + 0.1 N, the rest 0.05 N."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "layernorm" in name and name.endswith("weight")
                    else 0.05 * noise)


def _convert_hf_encoder(model, tmp_path, name: str):
    """Save a transformers encoder as an HF folder, convert it with the fixture decoder and
    stats through the CLI, and load the resulting RAE."""
    model.save_pretrained(tmp_path / name)
    out = tmp_path / "rae"
    args = _args(out)
    args[args.index("--encoder") + 1] = str(tmp_path / name)
    assert convert_main(args) == 0
    return load_rae(str(out))


def test_vit_mae_encoder_matches_transformers(tmp_path):
    """MAE-B-style encoder (tiny random ViTMAEForPreTraining, saved as an HF folder) in
    an RAE with the fixture decoder. Assumed, as for DINOv2: RAE's MAE encoder drops the
    final LayerNorm's affine and keeps the patch tokens in image order (no masking)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=224, patch_size=16,
                          mask_ratio=0.0, decoder_hidden_size=16,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=32)
    model = ViTMAEForPreTraining(config).eval()
    _randomise(model, 0)
    with torch.no_grad():  # the affine RAE drops, neutral here so torch's output compares
        model.vit.layernorm.weight.fill_(1.0)
        model.vit.layernorm.bias.zero_()
    rae = _convert_hf_encoder(model, tmp_path, "mae")
    assert rae.cfg.encoder.input_size == (256, 256) and rae.encoder.register_tokens is None

    images = np.random.default_rng(3).random((2, 256, 256, 3), dtype=np.float32)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    noise = torch.arange(256, dtype=torch.float32).expand(2, 256)  # identity "shuffle"
    with torch.no_grad():
        hidden = model.vit(x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
    hidden = hidden.numpy()
    ours = np.asarray(rae.encoder(rae.preprocess(images)))
    assert np.abs(ours - hidden).max() < 2e-5
    var = read_stats(fixture_path("rae", "stat.pt"))["var"].transpose(1, 2, 0)
    latents, cls = rae.encode(images)
    ref = hidden[:, 1:].reshape(2, 16, 16, 32) / np.sqrt(var + 1e-5)
    assert np.abs(np.asarray(latents) - ref).max() < 2e-5
    assert np.abs(np.asarray(cls) - hidden[:, 0]).max() < 1e-5


def test_siglip2_encoder_matches_transformers(tmp_path):
    """SigLIP2 vision tower (tiny random Siglip2VisionModel with an 8x8 position grid,
    so the bilinear-antialias table resize to 16x16 is exercised) in an RAE with the
    fixture decoder. Assumed: RAE's SigLIP2 encoder uses every patch token of the last
    hidden state after an affine-free final LayerNorm; the pooling head is unused."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_patches=64, patch_size=16)
    model = Siglip2VisionModel(config).eval()
    _randomise(model, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)  # LN weights around 1
        model.post_layernorm.weight.fill_(1.0)
        model.post_layernorm.bias.zero_()
    rae = _convert_hf_encoder(model, tmp_path, "siglip2")
    assert rae.cfg.encoder.input_size == (256, 256) and rae.encoder.cls_token is None

    images = np.random.default_rng(4).random((2, 256, 256, 3), dtype=np.float32)
    x = rae.preprocess(images)
    patches = np.asarray(x).reshape(2, 16, 16, 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(patches.reshape(2, 256, 768).copy()),
                       pixel_attention_mask=torch.ones(2, 256, dtype=torch.long),
                       spatial_shapes=torch.tensor([[16, 16], [16, 16]])).last_hidden_state
    hidden = hidden.numpy()
    assert np.abs(np.asarray(rae.encoder(x)) - hidden).max() < 2e-5
    var = read_stats(fixture_path("rae", "stat.pt"))["var"].transpose(1, 2, 0)
    latents, cls = rae.encode(images)
    assert cls is None
    ref = hidden.reshape(2, 16, 16, 32) / np.sqrt(var + 1e-5)
    assert np.abs(np.asarray(latents) - ref).max() < 2e-5
