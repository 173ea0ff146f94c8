"""PyTorch DiTDH checkpoint (RAE / MM-FM) to a JAX model directory (mmfm_jax.models.load_ditdh).

Reads an MM-FM or RAE training dict ({model, ema, ...}) or a raw state dict (RAE's released
`stage2_model.pt`), with `module.` / `_orig_mod.` prefixes stripped. Weights: `ema` when
present; a dict with `model` but no `ema` is refused unless `--weights model` (the upstream
loader rule). The architecture comes from `--params` (the `stage_2.params` mapping as JSON or
YAML, or a whole upstream config YAML) or, without it, is inferred from the tensor shapes.
Every key must be consumed with the expected shape; the output is written atomically,
with the blocks unrolled (`blocks/{i}/...`, default) or stacked for `lax.scan`
(`--scan-blocks`); either layout loads into either model.

Conditioning (`use_y_conditioning`, which shapes cannot show: an unconditional model still
carries its unused label table) comes from, in this order: `--conditional/--unconditional`,
a `use_y_conditioning` entry of `--params`, the MM-FM training dict (`training_cfg`
entries, the training YAML named by `config_path`: `...-UNCONDITIONAL-...` or
`...-MODE-CONDITIONAL-...`), the release file name (`uncond-gmm-*`, `mode-gmm-*`). A training
dict that says nothing is refused with one line; a raw state dict is RAE's release layout
(class-conditional) unless its name says otherwise; with `--params`, upstream's default
(conditional) applies.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from convert.common import ConversionError, KeyConsumer, load_torch, report, to_numpy_state
from convert.conditioning import resolve as resolve_conditioning
from convert.conditioning import unused_table_note


def add_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True, help="PyTorch checkpoint (.pt)")
    parser.add_argument("--params", default=None,
                        help="stage_2.params as JSON/YAML, or an upstream config YAML with a "
                             "stage_2 block (default: inferred from the checkpoint shapes)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--weights", choices=("ema", "model"), default=None,
                        help="which weights of a training dict (default: ema, as upstream)")
    parser.add_argument("--scan-blocks", action="store_true",
                        help="store the blocks stacked (scan_blocks layout); either layout "
                             "loads into either model")
    cond = parser.add_mutually_exclusive_group()
    cond.add_argument("--conditional", dest="conditioning", action="store_const", const=True,
                      default=None, help="the model reads its label (mode or class) y")
    cond.add_argument("--unconditional", dest="conditioning", action="store_const",
                      const=False, help="the model ignores y (use_y_conditioning false; "
                                        "its label table is kept but unused)")


def select_state(obj, path: str, weights: str | None = None) -> tuple[Mapping, str]:
    """Upstream's loader rule: `ema` when present; `model` only on request; else raw."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a dict")
    if weights is not None:
        if weights not in obj:
            raise ConversionError(f"{path}: --weights {weights} requested but the file has no "
                                  f"{weights!r} entry (top-level keys: {sorted(obj)[:10]})")
        return obj[weights], weights
    if "ema" in obj:
        return obj["ema"], "ema"
    if "model" in obj:
        raise ConversionError(f"{path}: has 'model' weights but no 'ema' (upstream refuses "
                              "raw-model loading); pass --weights model to convert them anyway")
    return obj, "raw state dict"


def read_params(path: str) -> dict:
    """`stage_2.params` from a JSON/YAML mapping or from an upstream config with stage_2."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such params file")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConversionError(f"{path}: neither JSON nor YAML: {e}") from e
    if isinstance(data, Mapping) and "stage_2" in data:
        data = (data["stage_2"] or {}).get("params")
    if not isinstance(data, Mapping) or "hidden_size" not in data:
        raise ConversionError(f"{path}: expected the stage_2.params mapping (with hidden_size, "
                              "depth, num_heads, ...) or a config with stage_2: {params: ...}")
    return dict(data)


def _shape(state: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: cannot infer the architecture: key {key!r} missing; "
                              "pass --params")
    return tuple(state[key].shape)


def infer_params(state: Mapping[str, np.ndarray], source: str) -> dict:
    """stage_2.params from tensor shapes (class_dropout_prob 0.1 and mlp_ratio 4 assumed)."""
    de, c = _shape(state, "s_embedder.proj.weight", source)[:2]
    dh = _shape(state, "x_embedder.proj.weight", source)[0]
    n = _shape(state, "pos_embed", source)[1]
    size = math.isqrt(n)
    if size * size != n:
        raise ConversionError(f"{source}: pos_embed has {n} tokens, not a square")
    blocks = sorted({int(m.group(1)) for k in state
                     if (m := re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", k))})
    widths = [_shape(state, f"blocks.{i}.norm1.weight", source)[0] for i in blocks]
    if de == dh:
        raise ConversionError(f"{source}: encoder and head have the same width {de}, so the "
                              "depth split cannot be inferred; pass --params")
    depth = [sum(w == de for w in widths), sum(w == dh for w in widths)]
    heads = [d // _shape(state, f"{name}.freqs_cos", source)[1]
             for d, name in ((de, "enc_feat_rope"), (dh, "dec_feat_rope"))]
    hidden = _shape(state, "blocks.0.mlp.w12.weight", source)[0] // 2
    if hidden != int(2 / 3 * 4.0 * de):
        raise ConversionError(f"{source}: SwiGLU width {hidden} does not match mlp_ratio 4; "
                              "pass --params")
    rows = _shape(state, "y_embedder.embedding_table.weight", source)[0]
    return dict(input_size=size, patch_size=1, in_channels=c, hidden_size=[de, dh],
                depth=depth, num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                num_classes=rows - 1, use_qknorm=False, use_swiglu=True, use_rope=True,
                use_rmsnorm=True, wo_shift=False)


def map_state(state: Mapping[str, np.ndarray], config, source: str) -> dict[str, np.ndarray]:
    """Upstream arrays -> {"path": array} of the port, refusing any missing, unexpected or
    mis-shaped key. Unrolled blocks are views (no copies), so shape-only inputs cost no
    memory; with `config.scan_blocks` the upstream `blocks.{i}` are stacked along the
    leading axis of `encoder_blocks/...` and `head_blocks/...` (a copy)."""
    from mmfm_jax.models.ditdh import from_torch_layout, torch_key_map

    keys = KeyConsumer(state, source)
    out, layers = {}, {}
    for spec in torch_key_map(config):
        value = keys.take(spec.torch_key, spec.torch_shape)
        if value is None or tuple(value.shape) != spec.torch_shape:
            continue
        if spec.layer is None:
            out[spec.path] = from_torch_layout(spec.kind, value)
        else:
            layers.setdefault(spec.path, []).append(from_torch_layout(spec.kind, value))
    keys.finish()
    out.update({path: np.stack(values) for path, values in layers.items()})
    return out


def convert(ckpt: str, out_dir: str, params: str | None = None,
            weights: str | None = None, conditioning: bool | None = None,
            scan_blocks: bool = False) -> list[str]:
    """Convert `ckpt` into `out_dir`; returns the report lines. `conditioning` (None: read
    from the file, see `convert.conditioning`) sets use_y_conditioning."""
    from mmfm_jax.models.ditdh import DiTDHConfig, save_arrays

    lines = [f"read {ckpt}"]
    obj = load_torch(ckpt)
    raw, which = select_state(obj, ckpt, weights)
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{ckpt}: the {which} entry is a {type(raw).__name__}, "
                              "not a state dict")
    state = to_numpy_state(raw, ckpt)
    lines.append(f"  weights: {which}, {len(state)} tensors")
    if params is None:
        upstream = infer_params(state, ckpt)
        lines.append("  config: inferred from the checkpoint shapes (class_dropout_prob 0.1, "
                     "mlp_ratio 4 assumed; pass --params to set them)")
    else:
        upstream = read_params(params)
        lines.append(f"  config: {params}")
    use_y, line = resolve_conditioning(obj, ckpt, requested=conditioning,
                                       params=None if params is None else upstream)
    upstream["use_y_conditioning"] = use_y
    lines += [line, *unused_table_note(state, use_y)]
    try:
        config = DiTDHConfig.from_upstream_params(upstream, scan_blocks=scan_blocks)
    except ValueError as e:
        raise ConversionError(f"{params or ckpt}: {e}") from e
    arrays = map_state(state, config, ckpt)
    save_arrays(config, arrays, out_dir)
    n_params = sum(int(np.prod(a.shape)) for p, a in arrays.items()
                   if p not in _NON_TRAINABLE and not p.endswith(("freqs_cos", "freqs_sin")))
    lines.append(f"wrote {out_dir}: {len(arrays)} arrays, {n_params:,} trainable parameters, "
                 f"config {json.dumps(config.to_dict(), sort_keys=True)}")
    return lines


_NON_TRAINABLE = ("pos_embed", "t_embedder/W")


def run(args) -> None:
    report(convert(args.ckpt, args.out, params=args.params, weights=args.weights,
                   conditioning=args.conditioning, scan_blocks=args.scan_blocks))
