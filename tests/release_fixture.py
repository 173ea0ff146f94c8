"""A synthetic MM-FM release folder, in exactly the layout of `luo00042/mm-fm` (REFERENCE.md
g.9), built from ../shared/fixtures so that every converter and the reproduction run on it.

Everything is sized to the fixture RAE (DINOv2 width 32, 16x16 latent grid), so the
converted models sample and decode end to end:

* checkpoints/dinov2-b/{uncond,mode}-gmm-{25k,100k}.pt and
  checkpoints/autoguidance/dit-s-{uncond,mode}-gmm-25k.pt: MM-FM training dicts ({model,
  ema, opt, scheduler, train_steps, epoch, config_path, training_cfg, cli_overrides}) whose
  weights are the fixture DiTDH main model (fixtures/ditdh/checkpoint.pt) and guide
  (guide_raw_state_dict.pt), with the input-side tensors re-made for 32 channels at 16x16
  (x/s embedders, final linear, pos-embed and RoPE tables) and the label table cut to the
  K = 6 modes of the fixture GMM (+ the null row). Unconditional files keep their label
  table, as upstream's do.
* gmm/dinov2-b/: the fixture CLS pickle as is, and a spatial pickle in MM-FM's layout with
  means for the 32x16x16 latent (written by `gmm.io.export_mmfm_pickles`).
* decoders/dinov2-b/ViTXL_n08/model.pt (+ its ViTMAEConfig as config.json, for the head
  count) and normalization_stats/dinov2-b/stat.pt: the fixture RAE decoder and stats.
* fid_reference/VIRTUAL_imagenet256_labeled.npz: 8 centre-cropped photographs (arr_0).

Beside the release (as a user supplies them): the fixture's Hugging Face encoder folder
and the FID Inception weights rebuilt from fixtures/inception's recipe.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from tests.conftest import fixture_path

K = 6  # modes of the fixture GMM
LATENT_CHW = (32, 16, 16)  # the fixture RAE's latent
NUM_REFERENCE = 8
TRAINING_YAML = ("configs/stage2/training/ImageNet256/"
                 "DiTDH-{size}_DINOv2-B-{setting}-GMM-8192-DIAG.yaml")
YAML_SETTING = {"uncond": "UNCONDITIONAL", "mode": "MODE-CONDITIONAL"}


def _resized(state: dict, heads: tuple[int, int], seed: int) -> dict:
    """A fixture DiTDH state dict re-made for LATENT_CHW inputs and K modes (same key order)."""
    from mmfm_jax.models.ditdh import rope_tables, sincos_pos_embed

    c, size, _ = LATENT_CHW
    de = state["s_embedder.proj.weight"].shape[0]
    dh = state["x_embedder.proj.weight"].shape[0]
    rng = np.random.default_rng(seed)
    rope = {"enc": rope_tables(de // heads[0], size), "dec": rope_tables(dh // heads[1], size)}
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            new = sincos_pos_embed(de, size)
        elif key.endswith("feat_rope.freqs_cos") or key.endswith("feat_rope.freqs_sin"):
            new = rope[key[:3]][0 if key.endswith("cos") else 1]
        elif key in ("x_embedder.proj.weight", "s_embedder.proj.weight"):
            new = 0.05 * rng.standard_normal((value.shape[0], c, 1, 1))
        elif key == "final_layer.linear.weight":
            new = 0.05 * rng.standard_normal((c, value.shape[1]))
        elif key == "final_layer.linear.bias":
            new = 0.05 * rng.standard_normal((c,))
        elif key == "y_embedder.embedding_table.weight":
            new = value[: K + 1].numpy()
        else:
            out[key] = value.clone()
            continue
        out[key] = torch.from_numpy(np.ascontiguousarray(new, np.float32))
    return out


def training_dict(weights: dict, *, size: str, setting: str, steps: int) -> dict:
    """MM-FM's `train.py` checkpoint layout (REFERENCE.md g.1) around `weights`."""
    yaml = TRAINING_YAML.format(size=size, setting=YAML_SETTING[setting])
    return {"model": weights, "ema": {k: v.clone() for k, v in weights.items()}, "opt": {},
            "scheduler": None, "train_steps": steps, "epoch": steps // 1251,
            "config_path": yaml,
            "training_cfg": {"epochs": 80, "global_batch_size": 1024, "ema_decay": 0.9995,
                             "ckpt_every": 5000, "global_seed": 0},
            "cli_overrides": {"data_path": "/data/imagenet/train", "results_dir": "results",
                              "image_size": 256, "precision": "bf16", "global_seed": 0}}


def main_weights(seed: int = 0) -> dict:
    ema = torch.load(fixture_path("ditdh", "checkpoint.pt"), weights_only=True)["ema"]
    return _resized(ema, (2, 3), seed)


def guide_weights(seed: int = 1) -> dict:
    raw = torch.load(fixture_path("ditdh", "guide_raw_state_dict.pt"), weights_only=True)
    return _resized(raw, (1, 2), seed)


def _checkpoints(root: str) -> None:
    folder = os.path.join(root, "checkpoints", "dinov2-b")
    guides = os.path.join(root, "checkpoints", "autoguidance")
    os.makedirs(folder)
    os.makedirs(guides)
    for i, setting in enumerate(("uncond", "mode")):
        for steps in (25_000, 100_000):
            weights = main_weights(seed=10 * i + steps // 25_000)
            torch.save(training_dict(weights, size="XL", setting=setting, steps=steps),
                       os.path.join(folder, f"{setting}-gmm-{steps // 1000}k.pt"))
        torch.save(training_dict(guide_weights(seed=100 + i), size="S", setting=setting,
                                 steps=25_000),
                   os.path.join(guides, f"dit-s-{setting}-gmm-25k.pt"))


def _gmm(root: str) -> None:
    import jax.numpy as jnp

    from mmfm_jax.gmm import io as gmm_io
    from mmfm_jax.gmm.mixture import SpatialMixture

    folder = os.path.join(root, "gmm", "dinov2-b")
    os.makedirs(folder)
    cls_name = f"gmm_n{K}_diag_k-means++.pkl"
    shutil.copyfile(fixture_path("gmm", cls_name), os.path.join(folder, cls_name))
    cls_mixture, _ = gmm_io.cls_from_mmfm(fixture_path("gmm", cls_name))
    c, h, w = LATENT_CHW
    rng = np.random.default_rng(7)
    spatial = SpatialMixture(cls_mixture.weights,
                             jnp.asarray(0.5 * rng.standard_normal((K, h, w, c)), jnp.float32),
                             jnp.asarray(rng.uniform(0.2, 1.5, K), jnp.float32))
    scratch = os.path.join(root, ".scratch_cls.pkl")
    gmm_io.export_mmfm_pickles(
        cls_mixture, spatial, scratch,
        os.path.join(folder, f"spatial_gmm_from_cls_n{K}_diag_k-means++_flip.pkl"),
        counts=np.full(K, 80))
    os.remove(scratch)


def _rae_parts(root: str) -> None:
    rae = fixture_path("rae")
    decoder = os.path.join(root, "decoders", "dinov2-b", "ViTXL_n08")
    stats = os.path.join(root, "normalization_stats", "dinov2-b")
    os.makedirs(decoder)
    os.makedirs(stats)
    shutil.copyfile(os.path.join(rae, "decoder.pt"), os.path.join(decoder, "model.pt"))
    shutil.copyfile(os.path.join(rae, "decoder_config", "config.json"),
                    os.path.join(decoder, "config.json"))
    shutil.copyfile(os.path.join(rae, "stat.pt"), os.path.join(stats, "stat.pt"))


def photo_crops(n: int) -> list[np.ndarray]:
    """n random square crops (256 px and up) of the photos bundled with skimage/sklearn."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(),
               *load_sample_images().images]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        photo = sources[i % len(sources)]
        hgt, wdt = photo.shape[:2]
        s = int(rng.integers(256, min(hgt, wdt) + 1))
        y, x = int(rng.integers(0, hgt - s + 1)), int(rng.integers(0, wdt - s + 1))
        crops.append(np.ascontiguousarray(photo[y:y + s, x:x + s, :3]))
    return crops


def photos(n: int) -> np.ndarray:
    """(n, 256, 256, 3) uint8: ADM centre crops of `photo_crops(n)`."""
    from PIL import Image

    from mmfm_jax.data.transforms import center_crop_arr

    return np.stack([center_crop_arr(Image.fromarray(c), 256)
                     for c in photo_crops(n)]).astype(np.uint8)


def build_release(root: str) -> dict[str, str]:
    """Write the release under `root`/release and the user's files beside it; returns the
    paths: release, encoder (HF folder), inception (weights file)."""
    from tests.test_inception import recipe_state_dict

    release = os.path.join(root, "release")
    os.makedirs(release)
    _checkpoints(release)
    _gmm(release)
    _rae_parts(release)
    os.makedirs(os.path.join(release, "fid_reference"))
    np.savez(os.path.join(release, "fid_reference", "VIRTUAL_imagenet256_labeled.npz"),
             arr_0=photos(NUM_REFERENCE))
    inception = os.path.join(root, "pt_inception-2015-12-05-6726825d.pth")
    torch.save(recipe_state_dict(), inception)
    return {"release": release, "encoder": fixture_path("rae", "dinov2_with_registers"),
            "inception": inception}


def _once(folder, build) -> None:
    """Run `build(folder)` unless an earlier test of this session already did."""
    done = os.path.join(folder, ".complete")
    if not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        build(folder)
        open(done, "w").close()


def shared_release(tmp_path_factory) -> dict[str, str]:
    """The synthetic release, built once per test session (under pytest's base temp)."""
    root = os.path.join(str(tmp_path_factory.getbasetemp()), "mmfm_release")
    _once(root, build_release)
    return {"release": os.path.join(root, "release"),
            "encoder": fixture_path("rae", "dinov2_with_registers"),
            "inception": os.path.join(root, "pt_inception-2015-12-05-6726825d.pth")}


def convert_argv(paths: dict[str, str], out: str, *extra: str) -> list[str]:
    return ["artifacts", "--src", paths["release"], "--encoder", f"dinov2-b={paths['encoder']}",
            "--inception", paths["inception"], "--out", out, *extra]


def shared_models(tmp_path_factory) -> str:
    """The release converted by `python -m convert artifacts`, once per test session."""
    from convert.__main__ import main as convert_main

    paths = shared_release(tmp_path_factory)
    models = os.path.join(str(tmp_path_factory.getbasetemp()), "mmfm_models")

    def build(folder):
        assert convert_main(convert_argv(paths, folder, "--jobs", "1")) == 0

    _once(models, build)
    return models
