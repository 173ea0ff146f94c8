"""Test setup: 8 fake CPU devices, float32 matmuls at highest precision, fixture paths.

XLA_FLAGS must be set before jax initialises its backend, so it happens at import time.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.normpath(os.path.join(REPO, "..", "shared", "fixtures"))


def fixture_path(*parts: str) -> str:
    """Absolute path inside ../shared/fixtures (read-only: write to tmp_path instead)."""
    path = os.path.join(FIXTURES, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"fixture {path} is missing; the shared fixtures must sit at "
                                f"{FIXTURES}")
    return path


def load_cases(*parts: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(*parts), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
    return FIXTURES
