"""pytorch-fid's pt_inception-2015-12-05 weights to the Flax FID Inception.

Reads the raw state dict (566 keys; torch-fidelity's inception-v3-compat uses the same
names) with weights_only=True, transposes conv kernels OIHW -> HWIO and fc (out, in) ->
(in, out), drops the BatchNorm `num_batches_tracked` counters, and writes a model
directory of the common format (`mmfm_jax.models.model_dir`: config.json +
weights.safetensors, "/"-joined variable paths) atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from convert.common import ConversionError, KeyConsumer, load_torch, report, to_numpy_state

_BN = {"bn_weight": "bn.weight", "bn_bias": "bn.bias", "bn_mean": "bn.running_mean",
       "bn_var": "bn.running_var"}


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True,
                        help="pt_inception-2015-12-05-*.pth (a raw state dict)")
    parser.add_argument("--out", required=True, help="output directory")


def convert_state(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Torch key names/layouts -> the variable paths of `mmfm_jax.models.inception`."""
    from mmfm_jax.models.inception import param_shapes

    shapes = param_shapes()
    convs = sorted({name.rsplit("/", 1)[0].replace("/", ".") for name in shapes
                    if name.endswith("/kernel") and not name.startswith("fc/")})
    keys = KeyConsumer(state, source,
                       ignore=tuple(f"{c}.bn.num_batches_tracked" for c in convs))
    out = {}
    for name, shape in shapes.items():
        module, leaf = name.rsplit("/", 1)
        module = module.replace("/", ".")  # torch's module path
        if name == "fc/kernel":
            value = keys.take("fc.weight", shape[::-1])
            value = None if value is None else value.T
        elif name == "fc/bias":
            value = keys.take("fc.bias", shape)
        elif leaf == "kernel":
            kh, kw, cin, cout = shape
            value = keys.take(f"{module}.conv.weight", (cout, cin, kh, kw))
            value = None if value is None else value.transpose(2, 3, 1, 0)
        else:
            value = keys.take(f"{module}.{_BN[leaf]}", shape)
        if value is not None:
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    keys.finish()
    return out


def run(args) -> None:
    from mmfm_jax.models import model_dir
    from mmfm_jax.models.inception import MODEL_DIR

    state = load_torch(args.weights)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{args.weights}: expected a state dict (mapping of tensors), "
                              f"got {type(state).__name__}")
    arrays = convert_state(to_numpy_state(state, args.weights), args.weights)
    model_dir.write(args.out, MODEL_DIR,
                    {"source": os.path.abspath(args.weights), "num_tensors": len(arrays),
                     "num_params": int(sum(a.size for a in arrays.values()))}, arrays)
    report([f"read {args.weights}: {len(state)} tensors",
            f"wrote {args.out}: {model_dir.WEIGHTS_FILE} ({len(arrays)} tensors, "
            f"{sum(a.size for a in arrays.values()):,} values), {model_dir.CONFIG_FILE}"])
