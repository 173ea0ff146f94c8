"""MM-FM's two GMM pickles (read without executing pickled code) to the project's GMM files.

Reads `gmm_n{K}_diag_k-means++.pkl` (CLS mixture, diagonal) and
`spatial_gmm_from_cls_n{K}_diag_k-means++_flip.pkl` (spatial mixture, one variance per
mode) through an allow-list unpickler, reorders the spatial means from C,H,W flattening to
(K, H, W, C), checks that both share K, and writes the directory `mmfm_jax.gmm.load` reads.
"""

from __future__ import annotations

import numpy as np

from convert.common import ConversionError, report
from mmfm_jax.files import atomic_directory


def add_arguments(parser) -> None:
    parser.add_argument("--cls", required=True, help="CLS GMM pickle (gmm_n{K}_diag_*.pkl)")
    parser.add_argument("--spatial", required=True, help="spatial GMM pickle")
    parser.add_argument("--latent-shape", required=True,
                        help="C,H,W of the latent the spatial means flatten (e.g. 768,16,16)")
    parser.add_argument("--out", required=True, help="output directory")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise ConversionError(f"--latent-shape={text!r}: expected three positive integers "
                              "C,H,W such as 768,16,16")
    return shape


def run(args) -> None:
    from mmfm_jax.gmm import io

    shape = _parse_shape(args.latent_shape)
    try:
        cls_mixture, cls_info = io.cls_from_mmfm(args.cls)
        spatial, counts, sp_info = io.spatial_from_mmfm(args.spatial, shape)
    except io.GMMFileError as e:
        raise ConversionError(str(e)) from e
    k = cls_mixture.n_components
    if spatial.n_components != k:
        raise ConversionError(f"{args.spatial}: {spatial.n_components} modes, but {args.cls} "
                              f"has {k} components (the mode index is shared)")
    weight_gap = float(np.max(np.abs(np.asarray(spatial.weights)
                                     - np.asarray(cls_mixture.weights))))
    with atomic_directory(args.out) as tmp:
        io.save_cls(tmp, cls_mixture, cls_info)
        io.save_spatial(tmp, spatial, counts, sp_info)
    report([
        f"read {args.cls}: CLS mixture K={k}, D={cls_mixture.means.shape[1]} (diag)",
        f"read {args.spatial}: spatial mixture K={k}, latent C,H,W={shape} -> means "
        f"{tuple(spatial.means.shape)} channels-last, {int(counts.sum())} latents counted",
        f"max |spatial weights - CLS weights| = {weight_gap:.3g}",
        f"wrote {args.out}",
    ])
