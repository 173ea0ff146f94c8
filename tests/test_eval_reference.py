"""`python -m mmfm_jax.evaluate reference`: an ADM-format reference batch from an npz or an
image folder, read back by `evaluate --ref` (the round trip)."""

import contextlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from mmfm_jax import evaluate
from mmfm_jax.data.transforms import center_crop_arr
from tests.release_fixture import photos
from tests.test_inception import converted_recipe_inception


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The fixture-recipe FID Inception and 8 photographs (and their npz)."""
    root = tmp_path_factory.mktemp("reference")
    converted_recipe_inception(root)
    images = photos(8)
    np.savez(root / "images.npz", arr_0=images)
    return {"root": root, "inception": str(root / "inception"), "images": images,
            "npz": str(root / "images.npz")}


def _reference(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_npz_reference_round_trip(assets, tmp_path):
    out = str(tmp_path / "ref.npz")
    summary = evaluate.build_reference(assets["npz"], out, assets["inception"], batch_size=8,
                                       subset=5, seed=3)
    assert summary["num_images"] == 8 and summary["num_subset"] == 5
    ref = _reference(out)
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
    assert all(ref[k].dtype == np.float64 for k in ("mu", "sigma", "mu_s", "sigma_s"))
    # arr_0: 5 of the 8 images, in their original order
    rows = [int(np.flatnonzero((assets["images"] == im).all(axis=(1, 2, 3)))[0])
            for im in ref["arr_0"]]
    assert ref["arr_0"].dtype == np.uint8 and rows == sorted(rows) and len(set(rows)) == 5
    # the images against their own reference: FID and sFID 0; evaluate reads it as --ref
    result = evaluate.evaluate_samples(assets["npz"], out, assets["inception"], batch_size=8)
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["reference_moments"] == "npz mu/sigma" and result["num_reference_images"] == 5
    assert result["recall"] == 1.0  # every reference image is one of the samples


def test_folder_reference_uses_adm_centre_crops(assets, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {"a.JPEG": (300, 420), "b.png": (256, 256), "sub/c.png": (700, 512),
             "sub/d.jpg": (260, 900)}
    for name, (h, w) in files.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(folder / "grey.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = str(tmp_path / "ref.npz")
    summary = evaluate.build_reference(str(folder), out, assets["inception"], batch_size=8)
    assert summary["num_images"] == 5 and summary["skipped"] == 1
    assert summary["first_skipped"] == [str(folder / "broken.jpg")]
    order = ["a.JPEG", "b.png", "grey.png", "sub/c.png", "sub/d.jpg"]  # sorted paths
    expected = np.stack([center_crop_arr(Image.open(folder / n).convert("RGB"), 256)
                         for n in order])
    ref = _reference(out)
    np.testing.assert_array_equal(ref["arr_0"], expected)
    # the same moments as a reference built from those crops stored as an npz
    np.savez(tmp_path / "crops.npz", arr_0=expected)
    again = evaluate.build_reference(str(tmp_path / "crops.npz"), str(tmp_path / "r2.npz"),
                                     assets["inception"], batch_size=8)
    assert again["num_images"] == 5
    ref2 = _reference(str(tmp_path / "r2.npz"))
    np.testing.assert_allclose(ref["mu"], ref2["mu"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ref["sigma"], ref2["sigma"], rtol=0, atol=1e-10)


def test_random_subset_does_not_depend_on_batching():
    rows = np.arange(1000)[:, None]
    a, b = evaluate.RandomSubset(100, seed=5), evaluate.RandomSubset(100, seed=5)
    for i in range(0, 1000, 7):
        a(rows[i:i + 7])
    for i in range(0, 1000, 250):
        b(rows[i:i + 250])
    np.testing.assert_array_equal(a.images(), b.images())
    kept = a.images()[:, 0]
    assert len(np.unique(kept)) == 100 and (np.diff(kept) > 0).all()
    few = evaluate.RandomSubset(100, seed=5)
    few(rows[:40])
    np.testing.assert_array_equal(few.images()[:, 0], np.arange(40))  # all when fewer


def test_cli_writes_and_refuses_with_one_line(assets, tmp_path, capsys):
    out = str(tmp_path / "cli.npz")
    rc = evaluate.main(["reference", "--images", assets["npz"], "--out", out,
                        "--inception", assets["inception"], "--batch-size", "8",
                        "--num-images", "4"])
    assert rc == 0 and f"wrote {out}: moments of 4 images" in capsys.readouterr().out
    assert _reference(out)["arr_0"].shape == (4, 256, 256, 3)
    rc = evaluate.main(["reference", "--images", str(tmp_path / "nope"), "--out", out,
                        "--inception", assets["inception"]])
    err = capsys.readouterr().err
    assert rc == 1 and "no such folder or npz file" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "nchw.npz"
    np.savez(bad, arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    out_buf = io.StringIO()
    with contextlib.redirect_stderr(out_buf):
        rc = evaluate.main(["reference", "--images", str(bad), "--out", out,
                            "--inception", assets["inception"]])
    assert rc == 1 and "channel-first" in out_buf.getvalue()
    assert os.path.exists(out)  # the earlier reference is left as it was
