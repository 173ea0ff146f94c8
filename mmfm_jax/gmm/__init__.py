"""MM-FM's Gaussian-mixture source: EM for the CLS mixture, the spatial statistics, files.

`fit_diag_gmm` fits the diagonal CLS mixture (sklearn semantics, jitted, on the mesh);
`spatial_pass` turns (latents, CLS) batches into the spatial mixture; `load` reads a
project GMM directory (written by `python -m convert gmm` or `--stage=fit_gmm`), and
`stage.load_fitted` a run's (config.gmm.path or `<workdir>/gmm`). The fit_gmm job that
encodes images for the fit is `gmm/job.py`, left out of this package's imports so that
the mixtures never pull in the data pipeline or the RAE.
"""

from mmfm_jax.gmm.em import FitResult, fit_diag_gmm
from mmfm_jax.gmm.io import (
    GMMFileError,
    export_mmfm_pickles,
    load,
    load_cls,
    load_spatial,
    read_mmfm_pickle,
    save_cls,
    save_spatial,
)
from mmfm_jax.gmm.mixture import CLSMixture, SpatialMixture
from mmfm_jax.gmm.spatial import spatial_pass
from mmfm_jax.gmm.stage import fit_from_batches

__all__ = [
    "CLSMixture", "FitResult", "GMMFileError", "SpatialMixture", "export_mmfm_pickles",
    "fit_diag_gmm", "fit_from_batches", "load", "load_cls", "load_spatial",
    "read_mmfm_pickle", "save_cls", "save_spatial", "spatial_pass",
]
