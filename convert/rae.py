"""DINOv2-with-registers (HF folder) + RAE decoder + latent statistics -> JAX RAE directory.

`python -m convert rae --encoder HF_DIR --decoder FILE.pt --stats FILE.pt --out DIR`

* HF_DIR holds config.json, model.safetensors (or a sharded index) and optionally
  preprocessor_config.json (image_mean/std; ImageNet's otherwise). The final
  `layernorm.*` (RAE's encoder LayerNorm has no affine) and the unused `mask_token` are
  dropped; every other key must be consumed. The 2-D position table is resized to the
  encoder grid here, once (torch bicubic with antialias), instead of on every forward.
  A ViT-MAE folder (`model_type` vit_mae, e.g. facebook/vit-mae-base) is accepted too:
  `vit.` prefixes are removed, the MAE pixel decoder (`decoder.*`) and the final
  `layernorm.*` are dropped (assumed affine-free as for DINOv2), and the table is
  resized as ViTMAE does (bicubic, no antialias).
* FILE.pt (decoder) is a raw `GeneralDecoder` state dict, or a full stage-1 RAE state
  dict whose decoder keys carry a `decoder.` prefix (its `encoder.` keys are skipped:
  the encoder comes from HF_DIR). Matching is strict, unlike upstream's strict=False.
  Sizes come from the tensor shapes; the head count, which shapes do not fix, comes
  from --decoder-config (the upstream ViTMAEConfig json), --decoder-heads, or the
  released ViT-XL decoder's 16 heads.
* The statistics file is {'mean': tensor or None, 'var': tensor}, (C, h, w); it is
  stored channels-last (h, w, C).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from convert.common import ConversionError, KeyConsumer, load_torch, report, to_numpy_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per encoder family: HF key names of a block's parts (src) for the port's names (dst).
HF_ATTENTION = {"query": "attention.attention.query", "key": "attention.attention.key",
                "value": "attention.attention.value", "out": "attention.output.dense"}
BLOCK_KEYS = {
    "dinov2_with_registers": {**HF_ATTENTION, "norm1": "norm1", "norm2": "norm2",
                              "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    "vit_mae": {**HF_ATTENTION, "norm1": "layernorm_before", "norm2": "layernorm_after",
                "fc1": "intermediate.dense", "fc2": "output.dense"},
    "siglip2_vision_model": {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
                             "value": "self_attn.v_proj", "out": "self_attn.out_proj",
                             "norm1": "layer_norm1", "norm2": "layer_norm2",
                             "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
}
LAYER_PREFIX = {"dinov2_with_registers": "encoder.layer", "vit_mae": "encoder.layer",
                "siglip2_vision_model": "encoder.layers"}
# RAE's final encoder LayerNorm has no affine (assumed so for MAE and SigLIP2 too).
FINAL_NORM = {"dinov2_with_registers": "layernorm", "vit_mae": "layernorm",
              "siglip2_vision_model": "post_layernorm"}
# (width, layers, mlp) -> heads of released RAE decoders whose config is not at hand.
KNOWN_DECODER_HEADS = {(1152, 28, 4096): 16}  # ViTXL_n08 (REFERENCE.md b.3)


def add_arguments(parser) -> None:
    parser.add_argument("--encoder", required=True,
                        help="Hugging Face encoder folder (config.json, model.safetensors, "
                             "preprocessor_config.json): DINOv2-with-registers, ViT-MAE "
                             "or SigLIP2 vision")
    parser.add_argument("--decoder", required=True,
                        help="RAE decoder state dict (.pt), raw or with a `decoder.` prefix")
    parser.add_argument("--stats", required=True,
                        help="latent statistics (.pt): {'mean': tensor|None, 'var': tensor}")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--decoder-config", default=None,
                        help="upstream decoder ViTMAEConfig json (gives the head count)")
    parser.add_argument("--decoder-heads", type=int, default=None,
                        help="decoder attention heads, when no --decoder-config is given")
    parser.add_argument("--encoder-input-size", type=int, default=None,
                        help="encoder input side (default: encoder patch x decoder grid)")
    parser.add_argument("--eps", type=float, default=1e-5,
                        help="latent normalisation eps, inside the sqrt (default 1e-5)")


# --------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


def read_hf_encoder(hf_dir: str) -> tuple[dict, dict[str, np.ndarray], dict | None]:
    """(config.json, {key: float32 array}, preprocessor_config.json or None)."""
    from safetensors import safe_open

    config = _read_json(os.path.join(hf_dir, "config.json"))
    single = os.path.join(hf_dir, "model.safetensors")
    index = single + ".index.json"
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        files = sorted({os.path.join(hf_dir, f)
                        for f in _read_json(index)["weight_map"].values()})
    else:
        raise ConversionError(f"{hf_dir}: no model.safetensors (or its index) found")
    state = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ConversionError(f"{path}: cannot be read as safetensors: {e}") from e
        state.update(to_numpy_state(tensors, path))
    pre_path = os.path.join(hf_dir, "preprocessor_config.json")
    pre = _read_json(pre_path) if os.path.exists(pre_path) else None
    return config, state, pre


def read_stats(path: str) -> dict[str, np.ndarray | None]:
    """{'mean': array or None, 'var': array or None} from a torch file (weights_only)."""
    import torch

    obj = load_torch(path)
    if not isinstance(obj, Mapping) or "var" not in obj:
        raise ConversionError(f"{path}: expected a dict with 'var' (and 'mean'), got "
                              f"{type(obj).__name__}"
                              + (f" with keys {sorted(obj)}" if isinstance(obj, Mapping) else ""))
    extra = sorted(set(obj) - {"mean", "var"})
    if extra:
        raise ConversionError(f"{path}: unexpected keys {extra}; expected 'mean' and 'var'")
    out = {}
    for key in ("mean", "var"):
        value = obj.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: '{key}' holds {type(value).__name__}, "
                                  "expected a tensor or None")
        out[key] = None if value is None else value.detach().cpu().float().numpy()
    return out


def split_decoder_state(state: Mapping[str, np.ndarray], source: str
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
    """A raw decoder state dict as is; a full stage-1 RAE state dict -> its `decoder.`
    entries (prefix removed), skipping the `encoder.` ones. Returns (state, skipped)."""
    if not any(k.startswith("decoder.") for k in state):
        return dict(state), []
    decoder, skipped = {}, []
    for key, value in state.items():
        if key.startswith("decoder."):
            decoder[key[len("decoder."):]] = value
        elif key.startswith("encoder."):
            skipped.append(key)
        else:
            decoder[key] = value  # reported as unexpected by the strict match
    return decoder, skipped


# --------------------------------------------------------------------------- mapping


def _linear(kc: KeyConsumer, out: dict, src: str, dst: str, d_in: int, d_out: int) -> None:
    _put(kc, out, src + ".weight", (d_out, d_in), dst + "/kernel", lambda w: w.T)
    _put(kc, out, src + ".bias", (d_out,), dst + "/bias")


def _norm(kc: KeyConsumer, out: dict, src: str, dst: str, d: int) -> None:
    _put(kc, out, src + ".weight", (d,), dst + "/scale")
    _put(kc, out, src + ".bias", (d,), dst + "/bias")


def _put(kc: KeyConsumer, out: dict, key: str, shape: tuple[int, ...], dst: str,
         fn: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> None:
    """Take `key` with its expected shape; map it to `dst` only when it is present and
    well-shaped (the consumer reports the rest together)."""
    value = kc.take(key, shape)
    if value is not None and tuple(value.shape) == tuple(shape):
        out[dst] = fn(value)


def _block(kc: KeyConsumer, out: dict, src: str, dst: str, d: int, mlp: int, *,
           names: Mapping[str, str]) -> None:
    for part in ("query", "key", "value", "out"):
        _linear(kc, out, f"{src}.{names[part]}", f"{dst}/attn/{part}", d, d)
    _norm(kc, out, f"{src}.{names['norm1']}", f"{dst}/norm1", d)
    _norm(kc, out, f"{src}.{names['norm2']}", f"{dst}/norm2", d)
    _linear(kc, out, f"{src}.{names['fc1']}", f"{dst}/fc1", d, mlp)
    _linear(kc, out, f"{src}.{names['fc2']}", f"{dst}/fc2", mlp, d)


def _check_fields(hf: Mapping, checks: Mapping, source: str) -> None:
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise ConversionError(f"{source}: {key} = {hf.get(key)!r}, expected {want!r}")


def encoder_config(hf: Mapping, grid_size: tuple[int, int], source: str):
    """Dinov2Config from an HF Dinov2WithRegistersConfig, ViTMAEConfig or
    Siglip2VisionConfig dict; refuses variants the port does not implement (SwiGLU,
    other activations, no qkv bias)."""
    from mmfm_jax.models.dinov2 import Dinov2Config

    model_type = _family(hf)
    hf = _vision_config(hf)
    _check_fields(hf, {"hidden_act": "gelu_pytorch_tanh" if model_type.startswith("siglip2")
                       else "gelu", "qkv_bias": True}, source)
    try:
        d = int(hf["hidden_size"])
        common = dict(hidden_size=d, num_layers=int(hf["num_hidden_layers"]),
                      num_heads=int(hf["num_attention_heads"]),
                      patch_size=int(hf["patch_size"]), grid_size=tuple(grid_size),
                      num_channels=int(hf.get("num_channels", 3)))
        if model_type == "dinov2_with_registers":
            _check_fields(hf, {"use_swiglu_ffn": False}, source)
            return Dinov2Config(**common, mlp_dim=int(d * float(hf.get("mlp_ratio", 4.0))),
                                num_registers=int(hf.get("num_register_tokens", 4)),
                                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)))
        if model_type == "vit_mae":
            return Dinov2Config(**common, mlp_dim=int(hf["intermediate_size"]),
                                num_registers=0, layer_scale=False,
                                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)))
        if model_type == "siglip2_vision_model":
            return Dinov2Config(**common, mlp_dim=int(hf["intermediate_size"]),
                                num_registers=0, layer_scale=False, cls_token=False,
                                gelu_approximate=True,
                                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)))
    except KeyError as e:
        raise ConversionError(f"{source}: missing field {e.args[0]!r}") from None
    raise ConversionError(f"{source}: model_type {hf.get('model_type')!r}; expected "
                          "'dinov2_with_registers', 'vit_mae', 'siglip2' or "
                          "'siglip2_vision_model'")


def _family(hf: Mapping) -> str:
    model_type = hf.get("model_type", "")
    return "siglip2_vision_model" if model_type == "siglip2" else model_type


def _vision_config(hf: Mapping) -> Mapping:
    """A full Siglip2Model config nests the vision tower's."""
    return hf.get("vision_config", {}) if hf.get("model_type") == "siglip2" else hf


def split_encoder_state(hf: Mapping, state: Mapping[str, np.ndarray]
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Remove wrapper prefixes (ViTMAEForPreTraining's `vit.`, SigLIP2's
    `vision_model.`); returns (state, keys to drop: the final LN affine, DINOv2's
    mask_token, MAE's pixel decoder, SigLIP2's pooling head and text tower)."""
    family = _family(hf)
    prefix = {"vit_mae": "vit.", "siglip2_vision_model": "vision_model."}.get(family)
    if prefix:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    final = FINAL_NORM.get(family, "layernorm")
    extra = {"dinov2_with_registers": ("embeddings.mask_token",), "vit_mae": ("decoder.",),
             "siglip2_vision_model": ("head.", "text_model.", "logit_scale", "logit_bias")
             }.get(family, ())
    dropped = [k for k in state if k in (f"{final}.weight", f"{final}.bias")
               or any(k == e or (e.endswith(".") and k.startswith(e)) for e in extra)]
    return dict(state), dropped


def _position_table(kc: KeyConsumer, out: dict, cfg, family: str) -> None:
    """Resize the checkpoint's square position grid to the encoder grid, as the HF model
    does on every forward: bicubic with antialias (DINOv2), bicubic (ViT-MAE), bilinear
    with antialias (SigLIP2, no CLS row)."""
    from mmfm_jax.resize import (
        resize_bicubic_antialias_np,
        resize_bicubic_np,
        resize_bilinear_antialias_np,
    )

    d, prefix = cfg.hidden_size, int(cfg.cls_token)
    key = ("embeddings.position_embedding.weight" if family == "siglip2_vision_model"
           else "embeddings.position_embeddings")
    table = kc.take(key)
    if table is None:
        return
    table = table.reshape(-1, *table.shape[-1:]) if table.ndim in (2, 3) else table
    side = math.isqrt(max(table.shape[0] - prefix, 0)) if table.ndim == 2 else 0
    if side == 0 or table.shape != (prefix + side * side, d):
        kc.misshaped.append(f"{key}: shape {tuple(table.shape)}, expected "
                            f"({'1 + ' if prefix else ''}n*n, {d})")
        return
    resize = {"vit_mae": resize_bicubic_np, "siglip2_vision_model":
              resize_bilinear_antialias_np}.get(family, resize_bicubic_antialias_np)
    grid = resize(table[prefix:].reshape(side, side, d), cfg.grid_size)
    out["pos_embed"] = np.concatenate([table[:prefix], grid.reshape(-1, d)], axis=0)


def map_encoder(state: Mapping[str, np.ndarray], cfg, source: str, *,
                family: str = "dinov2_with_registers",
                dropped: tuple[str, ...] | list[str] = ()) -> dict[str, np.ndarray]:
    """HF keys -> {"encoder/...": array}, with the position table resized to the encoder
    grid. Strict, except the explicitly dropped keys."""
    kc = KeyConsumer(state, source, ignore=tuple(dropped))
    d, p, c, r = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.num_registers
    out: dict[str, np.ndarray] = {}
    if cfg.cls_token:
        _put(kc, out, "embeddings.cls_token", (1, 1, d), "cls_token", lambda x: x.reshape(d))
    if r:
        _put(kc, out, "embeddings.register_tokens", (1, r, d), "register_tokens",
             lambda x: x.reshape(r, d))
    if family == "siglip2_vision_model":  # Linear over (row, column, channel) patches
        _put(kc, out, "embeddings.patch_embedding.weight", (d, p * p * c), "patch_kernel",
             lambda w: w.T.reshape(p, p, c, d))
        _put(kc, out, "embeddings.patch_embedding.bias", (d,), "patch_bias")
    else:
        _put(kc, out, "embeddings.patch_embeddings.projection.weight", (d, c, p, p),
             "patch_kernel", lambda w: w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        _put(kc, out, "embeddings.patch_embeddings.projection.bias", (d,), "patch_bias")
    _position_table(kc, out, cfg, family)
    for layer in range(cfg.num_layers):
        src, dst = f"{LAYER_PREFIX[family]}.{layer}", f"layers/{layer}"
        _block(kc, out, src, dst, d, cfg.mlp_dim, names=BLOCK_KEYS[family])
        if cfg.layer_scale:
            _put(kc, out, f"{src}.layer_scale1.lambda1", (d,), f"{dst}/ls1")
            _put(kc, out, f"{src}.layer_scale2.lambda1", (d,), f"{dst}/ls2")
    kc.finish()
    return {f"encoder/{k}": v for k, v in out.items()}


def _shape(state: Mapping[str, np.ndarray], key: str, ndim: int, source: str,
           why: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: missing key {key} (needed for {why})")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{source}: key {key} has shape {shape}, expected {ndim} dims")
    return shape


def decoder_config(state: Mapping[str, np.ndarray], source: str, *,
                   upstream: Mapping | None = None, upstream_source: str = "",
                   heads: int | None = None):
    """DecoderConfig from the state-dict shapes; heads (and LN eps) from the upstream
    ViTMAEConfig when given, which must agree with the shapes."""
    from mmfm_jax.models.rae_decoder import DecoderConfig

    hidden, in_dim = _shape(state, "decoder_embed.weight", 2, source, "the widths")
    _, tokens, _ = _shape(state, "decoder_pos_embed", 3, source, "the token count")
    mlp, _ = _shape(state, "decoder_layers.0.intermediate.dense.weight", 2, source,
                    "the MLP width")
    out_dim, _ = _shape(state, "decoder_pred.weight", 2, source, "the patch size")
    layers = len({int(m.group(1)) for k in state
                  if (m := re.match(r"decoder_layers\.(\d+)\.", k))})
    upstream = dict(upstream or {})
    channels = int(upstream.get("num_channels", 3))
    patch = math.isqrt(out_dim // channels)
    side = math.isqrt(tokens - 1)
    if patch * patch * channels != out_dim:
        raise ConversionError(f"{source}: decoder_pred.weight has {out_dim} outputs, not "
                              f"patch^2 x {channels} channels")
    if side * side != tokens - 1:
        raise ConversionError(f"{source}: decoder_pos_embed has {tokens} rows, expected "
                              "1 + n*n (CLS + square grid)")
    eps = 1e-12
    if upstream:
        got = {"decoder_hidden_size": hidden, "decoder_num_hidden_layers": layers,
               "decoder_intermediate_size": mlp, "hidden_size": in_dim, "patch_size": patch,
               "hidden_act": "gelu", "qkv_bias": True}
        for key, value in got.items():
            if key in upstream and upstream[key] != value:
                raise ConversionError(f"{upstream_source}: {key} = {upstream[key]!r}, but "
                                      f"{source} implies {value!r}")
        if heads is not None and heads != upstream.get("decoder_num_attention_heads", heads):
            raise ConversionError(f"--decoder-heads {heads} disagrees with "
                                  f"{upstream_source} ({upstream['decoder_num_attention_heads']})")
        heads = upstream.get("decoder_num_attention_heads", heads)
        eps = float(upstream.get("layer_norm_eps", eps))
    if heads is None:
        heads = KNOWN_DECODER_HEADS.get((hidden, layers, mlp))
    if heads is None:
        raise ConversionError(f"{source}: decoder width {hidden}, {layers} layers, MLP {mlp} "
                              "is not a known release; pass --decoder-config or "
                              "--decoder-heads")
    if hidden % heads:
        raise ConversionError(f"{source}: decoder width {hidden} is not divisible by "
                              f"{heads} heads")
    return DecoderConfig(in_dim=in_dim, hidden_size=hidden, num_layers=layers,
                         num_heads=int(heads), mlp_dim=mlp, patch_size=patch,
                         grid_size=(side, side), num_channels=channels, layer_norm_eps=eps)


def map_decoder(state: Mapping[str, np.ndarray], cfg, source: str) -> dict[str, np.ndarray]:
    """GeneralDecoder keys -> {"decoder/...": array}, strictly."""
    kc = KeyConsumer(state, source)
    d, n = cfg.hidden_size, cfg.num_patches
    out: dict[str, np.ndarray] = {}
    _put(kc, out, "decoder_pos_embed", (1, 1 + n, d), "pos_embed", lambda x: x[0])
    _put(kc, out, "trainable_cls_token", (1, 1, d), "cls_token", lambda x: x.reshape(d))
    _linear(kc, out, "decoder_embed", "embed", cfg.in_dim, d)
    for layer in range(cfg.num_layers):
        _block(kc, out, f"decoder_layers.{layer}", f"layers/{layer}", d, cfg.mlp_dim,
               names=BLOCK_KEYS["vit_mae"])
    _norm(kc, out, "decoder_norm", "norm", d)
    _linear(kc, out, "decoder_pred", "pred", d, cfg.patch_size ** 2 * cfg.num_channels)
    kc.finish()
    return {f"decoder/{k}": v for k, v in out.items()}


def map_stats(stats: Mapping[str, np.ndarray | None], channels: int,
              grid: tuple[int, int], source: str) -> dict[str, np.ndarray]:
    """(C, h, w) statistics -> channels-last {"latent_var", "latent_mean"?}."""
    want = (channels, *grid)
    out = {}
    for key in ("var", "mean"):
        value = stats.get(key)
        if value is None:
            continue
        if tuple(value.shape) != want:
            raise ConversionError(f"{source}: '{key}' has shape {tuple(value.shape)}, "
                                  f"expected {want} (C, h, w)")
        out[f"latent_{key}"] = np.asarray(value, np.float32).transpose(1, 2, 0)
    if "latent_var" not in out:  # upstream: var None means 1
        out["latent_var"] = np.ones((*grid, channels), np.float32)
    elif not np.all(out["latent_var"] >= 0):
        raise ConversionError(f"{source}: 'var' has negative entries")
    return out


def build(hf_config: Mapping, encoder_state: Mapping[str, np.ndarray],
          decoder_state: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray | None], *,
          preprocessor: Mapping | None = None, decoder_upstream: Mapping | None = None,
          decoder_heads: int | None = None, encoder_input_size: int | None = None,
          eps: float = 1e-5, sources: Mapping[str, str] | None = None):
    """The whole mapping, without touching files: returns (RAEConfig, {name: array},
    dropped encoder keys).

    Arrays are only transposed or reshaped (views) apart from the position-table resize,
    so shape-only placeholders (e.g. zero-strided arrays) check the mapping cheaply.
    """
    from mmfm_jax.rae import RAEConfig, check_arrays

    src = {"encoder": "encoder", "decoder": "decoder", "stats": "stats",
           "decoder_config": "decoder config", **(sources or {})}
    dec_cfg = decoder_config(decoder_state, src["decoder"], upstream=decoder_upstream,
                             upstream_source=src["decoder_config"], heads=decoder_heads)
    patch = int(_vision_config(hf_config).get("patch_size", 0)) or 1
    grid = dec_cfg.grid_size
    if encoder_input_size is not None:
        if encoder_input_size % patch or encoder_input_size // patch != grid[0]:
            raise ConversionError(f"--encoder-input-size {encoder_input_size} gives a "
                                  f"{encoder_input_size // patch}-token grid, but the decoder "
                                  f"expects {grid[0]} (patch {patch})")
    enc_cfg = encoder_config(hf_config, grid, src["encoder"])
    encoder_state, dropped = split_encoder_state(hf_config, encoder_state)
    if enc_cfg.hidden_size != dec_cfg.in_dim:
        raise ConversionError(f"{src['decoder']}: decoder_embed takes {dec_cfg.in_dim} "
                              f"channels, but the encoder width is {enc_cfg.hidden_size}")
    pre = dict(preprocessor or {})
    cfg = RAEConfig(encoder=enc_cfg, decoder=dec_cfg,
                    image_mean=tuple(float(v) for v in pre.get("image_mean", IMAGENET_MEAN)),
                    image_std=tuple(float(v) for v in pre.get("image_std", IMAGENET_STD)),
                    latent_eps=float(eps), has_latent_mean=stats.get("mean") is not None)
    arrays = {**map_encoder(encoder_state, enc_cfg, src["encoder"],
                            family=_family(hf_config), dropped=dropped),
              **map_decoder(decoder_state, dec_cfg, src["decoder"]),
              **map_stats(stats, enc_cfg.hidden_size, grid, src["stats"])}
    try:
        check_arrays(cfg, arrays, "converted RAE")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return cfg, arrays, dropped


# --------------------------------------------------------------------------- command


def _count(state: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.prod(v.shape)) for v in state.values())


def run(args) -> None:
    from mmfm_jax.rae import write_rae

    hf_config, enc_state, pre = read_hf_encoder(args.encoder)
    raw = to_numpy_state(_as_state(load_torch(args.decoder), args.decoder), args.decoder)
    dec_state, skipped = split_decoder_state(raw, args.decoder)
    stats = read_stats(args.stats)
    upstream = _read_json(args.decoder_config) if args.decoder_config else None
    cfg, arrays, dropped = build(
        hf_config, enc_state, dec_state, stats, preprocessor=pre, decoder_upstream=upstream,
        decoder_heads=args.decoder_heads, encoder_input_size=args.encoder_input_size,
        eps=args.eps, sources={"encoder": args.encoder, "decoder": args.decoder,
                               "stats": args.stats,
                               "decoder_config": args.decoder_config or ""})
    enc, dec = cfg.encoder, cfg.decoder
    lines = [
        f"read {args.encoder} ({_family(hf_config)}): {len(enc_state)} tensors, "
        f"{_count(enc_state):,} values; width {enc.hidden_size}, {enc.num_layers} layers, "
        f"{enc.num_heads} heads, MLP {enc.mlp_dim}, patch {enc.patch_size}, "
        f"{enc.num_registers} registers; "
        f"dropped {_summary(dropped)}; image mean {cfg.image_mean} std "
        f"{cfg.image_std}" + ("" if pre else " (no preprocessor_config.json: ImageNet)"),
        f"  position table resized to {enc.grid_size[0]}x{enc.grid_size[1]} for "
        f"{enc.input_size[0]}x{enc.input_size[1]} input, as {_family(hf_config)} does",
        f"read {args.decoder}: {len(dec_state)} tensors, {_count(dec_state):,} values; "
        f"width {dec.hidden_size}, {dec.num_layers} layers, {dec.num_heads} heads, MLP "
        f"{dec.mlp_dim}, patch {dec.patch_size}, output {dec.image_size[0]}x"
        f"{dec.image_size[1]}, LN eps {dec.layer_norm_eps:g}"
        + (f"; skipped {len(skipped)} encoder.* keys of the full RAE dict" if skipped else ""),
        f"read {args.stats}: var {tuple(stats['var'].shape) if stats['var'] is not None else None}"
        f", mean {'None' if stats['mean'] is None else tuple(stats['mean'].shape)}; "
        f"eps {cfg.latent_eps:g}",
    ]
    write_rae(args.out, cfg, arrays)
    lines.append(f"wrote {args.out}: {len(arrays)} arrays, {_count(arrays):,} values, "
                 "config.json + weights.safetensors")
    report(lines)


def _summary(keys: list[str]) -> str:
    if len(keys) > 6:
        return f"{', '.join(keys[:6])} and {len(keys) - 6} more"
    return ", ".join(keys) or "nothing"


def _as_state(obj, source: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: expected a state dict, got {type(obj).__name__}")
    return obj
