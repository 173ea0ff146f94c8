"""Input pipeline: ADM crop parity, ImageFolder/ArrayRecord/digits/latent-cache sources, skips,
flips, process sharding, exact resume (also through orbax), and the ordered eval pass."""

import json
import logging
import os

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmfm_jax import data as D

SIZE = 16  # crop size for the generated trees


def adm_center_crop_arr(pil_image, image_size):
    """Verbatim from guided-diffusion/improved_diffusion image_datasets.py (ADM)."""
    # We are not on a new enough PIL to support the `reducing_gap`
    # argument, which uses BOX downsampling at powers of two first.
    # Thus, we do it by hand to improve downsample quality.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _cfg(kind="imagefolder", path="", **kw):
    base = dict(kind=kind, path=path, image_size=SIZE, num_workers=0, prefetch=2,
                random_flip=True, latent_cache="", read_threads=4)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _make_tree(root, rng):
    """3 classes x 8 noise images of varied sizes and modes (JPEG, grayscale, RGBA PNG)."""
    sizes = [(20, 30), (31, 17), (70, 40), (16, 16), (45, 66), (23, 23), (40, 90), (19, 33)]
    for c in range(3):
        os.makedirs(root / f"class{c}" / "sub")
        for i, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if i == 1:
                Image.fromarray(arr[..., 0], "L").save(root / f"class{c}" / f"g{i}.JPEG")
            elif i == 3:
                rgba = np.concatenate([arr, arr[..., :1]], -1)
                Image.fromarray(rgba, "RGBA").save(root / f"class{c}" / "sub" / f"a{i}.png")
            else:
                Image.fromarray(arr).save(root / f"class{c}" / f"im{i}.jpg", quality=92)
        (root / f"class{c}" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A clean tree (24 images) and a dirty copy with a garbage and a truncated JPEG."""
    base = tmp_path_factory.mktemp("trees")
    _make_tree(base / "clean", np.random.default_rng(0))
    _make_tree(base / "dirty", np.random.default_rng(0))
    (base / "dirty" / "class1" / "im0_bad.jpg").write_bytes(b"this is not a jpeg")
    good = (base / "dirty" / "class2" / "im0.jpg").read_bytes()
    (base / "dirty" / "class2" / "im0_trunc.jpg").write_bytes(good[: len(good) // 2])
    return base / "clean", base / "dirty"


def _eval_all(cfg, **kw):
    batches = list(D.make_eval_loader(cfg, global_batch=8, process_index=0, process_count=1,
                                      **kw))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---- ADM centre crop ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos():
    import skimage.data
    from sklearn.datasets import load_sample_images

    imgs = {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
            "coffee": skimage.data.coffee()}
    imgs.update(zip(("china", "flower"), load_sample_images().images))
    return {k: Image.fromarray(v) for k, v in imgs.items()}


@pytest.mark.parametrize("size", [256, 224, 64, 8])
def test_center_crop_equals_adm_reference(photos, size):
    for name, img in photos.items():
        ours, ref = D.center_crop_arr(img, size), adm_center_crop_arr(img, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8, name
        np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_center_crop_box_halving_is_2x2_mean(photos):
    """astronaut is 512x512: its 256 crop is one BOX halving and no resize. PIL's BOX is
    separable: pair means rounded half-up along W, then along H."""
    x = np.asarray(photos["astronaut"]).astype(np.float64)
    w = np.floor((x[:, 0::2] + x[:, 1::2]) / 2 + 0.5)
    box = np.floor((w[0::2] + w[1::2]) / 2 + 0.5)
    np.testing.assert_array_equal(D.center_crop_arr(photos["astronaut"], 256), box)


# ---- sources and skips ----------------------------------------------------------------------

def test_imagefolder_order_and_labels(trees):
    classes, files, labels = D.list_imagefolder(str(trees[1]))
    assert classes == ["class0", "class1", "class2"]
    assert len(files) == 26 and "notes.txt" not in " ".join(files)
    # torchvision order: sorted walk, so files of a folder precede its subfolders' files
    assert files[:8] == ["class0/g1.JPEG"] + [f"class0/im{i}.jpg" for i in (0, 2, 4, 5, 6, 7)] \
        + ["class0/sub/a3.png"]
    assert files[8] == "class1/g1.JPEG" and "class1/im0_bad.jpg" in files
    np.testing.assert_array_equal(labels, [0] * 8 + [1] * 9 + [2] * 9)


def test_corrupt_images_are_skipped_counted_and_logged(trees, caplog):
    cfg = _cfg(path=str(trees[1]))
    _, files, labels = D.list_imagefolder(str(trees[1]))
    bad = [files.index("class1/im0_bad.jpg"), files.index("class2/im0_trunc.jpg")]
    loader = D.make_train_loader(cfg, global_batch=4, seed=3, process_index=0,
                                 process_count=1, num_epochs=1)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert loader.num_skipped == 2
    assert len(batches) == (26 - 2) // 4
    assert all(b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
               for b in batches)
    assert all(b["label"].dtype == np.int32 and set(b) == {"image", "label"} for b in batches)
    assert "class1/im0_bad.jpg" in caplog.text and "class2/im0_trunc.jpg" in caplog.text

    ev = _eval_all(cfg)
    np.testing.assert_array_equal(ev["index"][:26], np.arange(26))
    np.testing.assert_array_equal(np.flatnonzero(~ev["mask"][:26]), sorted(bad))
    assert not ev["mask"][26:].any() and (ev["index"][26:] == -1).all()
    np.testing.assert_array_equal(ev["label"][:26], labels)
    ref = [adm_center_crop_arr(Image.open(trees[1] / files[k]).convert("RGB"), SIZE)
           for k in (0, 7, 25)]
    np.testing.assert_array_equal(ev["image"][[0, 7, 25]], np.stack(ref))


def test_arrayrecord_pack_reads_like_imagefolder(trees, tmp_path, capsys):
    from mmfm_jax.data.__main__ import main

    out = tmp_path / "packed" / "train"
    main(["pack", "--src", str(trees[1]), "--out", str(out), "--num-shards", "3"])
    assert "packed 26 images into 3 shards" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "packed")) == [f"train-0000{i}-of-00003"
                                                       for i in range(3)]
    folder, packed = _cfg(path=str(trees[1])), _cfg(kind="arrayrecord", path=str(out))
    a, b = _eval_all(folder), _eval_all(packed)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["mask"].sum() == 24
    la = D.make_train_loader(folder, global_batch=4, seed=1, process_index=0, process_count=1)
    lb = D.make_train_loader(packed, global_batch=4, seed=1, process_index=0, process_count=1)
    _assert_same_batches(_take(iter(la), 8), _take(iter(lb), 8))
    with pytest.raises(FileNotFoundError, match="matches no ArrayRecord file"):
        D.make_train_loader(_cfg(kind="arrayrecord", path=str(tmp_path / "nope")),
                            global_batch=4, seed=0, process_index=0, process_count=1)


# ---- flips ------------------------------------------------------------------------------------

def test_flip_rng_is_fair_and_keyed_on_seed_record_epoch():
    flips = np.array([[D.flip_decision(D.record_rng(7, k, e)) for k in range(10_000)]
                      for e in range(2)])
    assert abs(flips.mean() - 0.5) < 0.015  # binomial sd 0.0035
    assert abs((flips[0] == flips[1]).mean() - 0.5) < 0.03  # epochs draw afresh
    again = [D.flip_decision(D.record_rng(7, k, 0)) for k in range(200)]
    other = [D.flip_decision(D.record_rng(8, k, 0)) for k in range(200)]
    np.testing.assert_array_equal(flips[0, :200], again)
    assert 0.3 < np.mean(np.asarray(other) == flips[0, :200]) < 0.7


def test_loader_flips_follow_the_record_rng(trees):
    cfg = _cfg(path=str(trees[0]))
    ev = _eval_all(cfg)
    lookup = {img.tobytes(): (k, False) for k, img in enumerate(ev["image"][:24])}
    lookup.update({img[:, ::-1].tobytes(): (k, True) for k, img in enumerate(ev["image"][:24])})
    seed, n_epochs = 5, 3
    loader = D.make_train_loader(cfg, global_batch=6, seed=seed, process_index=0,
                                 process_count=1, num_epochs=n_epochs)
    rows = [img for b in loader for img in b["image"]]
    assert len(rows) == 24 * n_epochs
    seen = [lookup[img.tobytes()] for img in rows]  # KeyError: neither crop nor its mirror
    for epoch in range(n_epochs):
        part = seen[24 * epoch: 24 * (epoch + 1)]
        assert sorted(k for k, _ in part) == list(range(24))  # each image once per epoch
        for k, flipped in part:
            assert flipped == D.flip_decision(D.record_rng(seed, k, epoch))
    assert 0.25 < np.mean([f for _, f in seen]) < 0.75
    plain = D.make_train_loader(_cfg(path=str(trees[0]), random_flip=False), global_batch=6,
                                seed=seed, process_index=0, process_count=1, num_epochs=1)
    assert not any(lookup[img.tobytes()][1] for b in plain for img in b["image"])


def test_worker_processes_give_the_same_records_and_flips(trees):
    """2 worker processes: batches interleave differently, the (record, flip) multiset of the
    first rounds and the skip count are the same as in-process."""
    def rows(workers):
        loader = D.make_train_loader(_cfg(path=str(trees[1]), num_workers=workers),
                                     global_batch=4, seed=2, process_index=0, process_count=1,
                                     num_epochs=1)
        out = sorted(img.tobytes() for b in loader for img in b["image"])
        return out, loader.num_skipped
    assert rows(0) == rows(2)


# ---- sharding, determinism, resume ----------------------------------------------------------

def test_processes_see_disjoint_halves_covering_the_epoch(trees):
    cfg = _cfg(path=str(trees[0]), random_flip=False)
    seen = []
    for p in range(2):
        batches = list(D.make_train_loader(cfg, global_batch=4, seed=0, process_index=p,
                                           process_count=2, num_epochs=1))
        assert len(batches) == 6 and batches[0]["image"].shape == (2, SIZE, SIZE, 3)
        seen.append({img.tobytes() for b in batches for img in b["image"]})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {img.tobytes() for img in _eval_all(cfg)["image"][:24]}
    with pytest.raises(ValueError, match="not divisible"):
        D.make_train_loader(cfg, global_batch=5, seed=0, process_index=0, process_count=2)


def test_two_processes_build_the_same_global_batches_as_one(trees):
    """Process p's k-th batch is the p-th block of the one-process k-th batch, flips too, so
    multi-host training sees exactly the single-host global batch (rows in process order)."""
    cfg = _cfg(path=str(trees[0]))
    one = list(D.make_train_loader(cfg, global_batch=4, seed=3, process_index=0,
                                   process_count=1, num_epochs=2))
    two = [list(D.make_train_loader(cfg, global_batch=4, seed=3, process_index=p,
                                    process_count=2, num_epochs=2)) for p in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 12
    for k, batch in enumerate(one):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                batch[key], np.concatenate([two[0][k][key], two[1][k][key]]))


def test_class_balanced_subset_for_the_data_limit_study(trees):
    labels = np.repeat([0, 1, 2], [10, 6, 4])
    keep = D.class_balanced_subset(labels, 0.5, seed=42)
    assert np.bincount(labels[keep]).tolist() == [5, 3, 2]
    np.testing.assert_array_equal(keep, D.class_balanced_subset(labels, 0.5, seed=42))
    assert not np.array_equal(keep, D.class_balanced_subset(labels, 0.5, seed=7))
    assert np.bincount(labels[D.class_balanced_subset(labels, 0.01, 0)]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="limit_fraction"):
        D.class_balanced_subset(labels, 0.0, 0)
    # the loaders (training stream and the GMM's ordered pass) see the same subset
    cfg = _cfg(path=str(trees[0]), limit_fraction=0.25, limit_seed=3)
    full = _eval_all(_cfg(path=str(trees[0])))
    sub = _eval_all(cfg)
    assert int(sub["mask"].sum()) == 6
    assert np.bincount(sub["label"][sub["mask"]]).tolist() == [2, 2, 2]
    full_images = {img.tobytes() for img in full["image"][full["mask"]]}
    assert {img.tobytes() for img in sub["image"][sub["mask"]]} <= full_images
    train = list(D.make_train_loader(_cfg(path=str(trees[0]), limit_fraction=0.25,
                                          limit_seed=3, random_flip=False),
                                     global_batch=2, seed=0, process_index=0, process_count=1,
                                     num_epochs=1))
    assert ({img.tobytes() for b in train for img in b["image"]}
            == {img.tobytes() for img in sub["image"][sub["mask"]]})


def test_same_seed_same_stream_other_seed_other_stream(trees):
    cfg = _cfg(path=str(trees[0]))
    make = lambda seed: iter(D.make_train_loader(cfg, global_batch=4, seed=seed,
                                                 process_index=0, process_count=1))
    a, b, c = _take(make(11), 9), _take(make(11), 9), _take(make(12), 9)
    _assert_same_batches(a, b)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_iterator_state_resumes_exactly(trees):
    cfg = _cfg(path=str(trees[1]))
    make = lambda: D.make_train_loader(cfg, global_batch=4, seed=4, process_index=1,
                                       process_count=2)
    it = iter(make())
    _take(it, 7)  # crosses the epoch boundary (13 records per process per epoch)
    state = it.get_state()
    expected = _take(it, 8)
    resumed = iter(make())
    resumed.set_state(state)
    _assert_same_batches(expected, _take(resumed, 8))


def test_iterator_state_resumes_through_orbax(trees, tmp_path):
    import orbax.checkpoint as ocp

    cfg = _cfg(path=str(trees[0]))
    make = lambda: iter(D.make_train_loader(cfg, global_batch=4, seed=9, process_index=0,
                                            process_count=1))
    it = make()
    _take(it, 5)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}
                               ) as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 6)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}
                               ) as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same_batches(expected, _take(resumed, 6))


def _split_rows(batch, parts):
    return [{k: np.split(v, parts)[i] for k, v in batch.items()} for i in range(parts)]


def test_global_batches_do_not_depend_on_the_worker_count(trees):
    """With grain worker processes too, process p's k-th batch is the p-th block of the
    k-th global batch (before, workers interleaved rows of different global batches)."""
    cfg = _cfg(path=str(trees[0]))
    one = _take(iter(D.make_train_loader(cfg, global_batch=4, seed=5, process_index=0,
                                         process_count=1)), 8)
    workers = _cfg(path=str(trees[0]), num_workers=2)
    two = [_take(iter(D.make_train_loader(workers, global_batch=4, seed=5, process_index=p,
                                          process_count=2)), 8) for p in range(2)]
    for k, batch in enumerate(one):
        for p, rows in enumerate(_split_rows(batch, 2)):
            _assert_same_batches([rows], [two[p][k]])


def test_position_resumes_on_any_process_and_worker_count(trees):
    """A position saved by 2 processes continues on 1, one saved by 1 on 2 (one of them
    with 2 grain workers): the next batches are those of the uninterrupted stream."""
    cfg = _cfg(path=str(trees[0]))
    make = lambda p, n, c=cfg: iter(D.make_train_loader(c, global_batch=4, seed=6,
                                                       process_index=p, process_count=n))
    whole = _take(make(0, 1), 11)  # 24 records: crosses the epoch boundary at batch 6
    halves = [make(p, 2) for p in range(2)]
    for it in halves:
        _take(it, 7)
    saved = halves[0].position()
    assert saved == halves[1].position() and saved["batches"] == 7 and saved["samples"] == 28
    resumed = make(0, 1)
    resumed.seek(saved)
    _assert_same_batches(_take(resumed, 4), whole[7:])
    assert resumed.batches == 11

    one = make(0, 1)
    _take(one, 3)
    for p in range(2):
        it = make(p, 2, _cfg(path=str(trees[0]), num_workers=2) if p else cfg)
        it.seek(one.position())
        got = _take(it, 4)
        for k in range(4):
            _assert_same_batches([_split_rows(whole[3 + k], 2)[p]], [got[k]])


def test_rebuilt_grain_state_is_what_grain_reports(trees):
    """`grain_state_at` against grain's own state after the same batches, for both of two
    processes without workers and for the second with two workers."""
    from mmfm_jax.data import position

    for workers, processes in ((0, (0, 1)), (2, (1,))):
        cfg = _cfg(path=str(trees[0]), num_workers=workers)
        for p in processes:
            it = iter(D.make_train_loader(cfg, global_batch=4, seed=1, process_index=p,
                                          process_count=2))
            template = json.loads(it.get_state())
            _take(it, 5)
            want = json.loads(it.get_state())
            got = position.grain_state_at(template, 5, process_index=p, process_count=2,
                                          local_batch=2)
            assert got == want, (workers, p)


def test_position_of_another_stream_is_refused_in_one_line(trees):
    cfg = _cfg(path=str(trees[0]))
    it = iter(D.make_train_loader(cfg, global_batch=4, seed=6, process_index=0,
                                  process_count=1))
    _take(it, 2)
    saved = it.position()
    for global_batch, seed, match in ((8, 6, "global batch is 8"), (4, 7, "seed")):
        other = iter(D.make_train_loader(cfg, global_batch=global_batch, seed=seed,
                                         process_index=0, process_count=1))
        with pytest.raises(ValueError, match=match) as err:
            other.seek(saved)
        assert "\n" not in str(err.value)


def test_host_batches_become_global_arrays_on_the_mesh(trees):
    from mmfm_jax.parallel import host_to_global, make_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1})
    batch = next(iter(D.make_train_loader(_cfg(path=str(trees[0])), global_batch=8, seed=0,
                                          process_index=0, process_count=1)))
    glob = host_to_global(batch, mesh)
    assert glob["image"].shape == (8, SIZE, SIZE, 3) and len(glob["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(glob["image"]), batch["image"])
    np.testing.assert_array_equal(np.asarray(glob["label"]), batch["label"])


# ---- eval pass ------------------------------------------------------------------------------

def test_eval_loader_orders_shards_and_masks_the_tail(trees):
    cfg = _cfg(path=str(trees[0]))
    full = _eval_all(cfg, image_size=24)
    assert full["image"].shape == (24, 24, 24, 3)
    loaders = [D.make_eval_loader(cfg, global_batch=10, image_size=24, process_index=p,
                                  process_count=2) for p in range(2)]
    assert [len(x) for x in loaders] == [3, 3]
    per_process = [list(x) for x in loaders]
    rows = {k: np.concatenate([b[k] for step in zip(*per_process) for b in step])
            for k in ("image", "index", "mask", "label")}
    np.testing.assert_array_equal(rows["index"], list(range(24)) + [-1] * 6)
    np.testing.assert_array_equal(rows["mask"], [True] * 24 + [False] * 6)
    np.testing.assert_array_equal(rows["image"][:24], full["image"])
    assert (rows["label"][24:] == -1).all() and not rows["image"][24:].any()


# ---- digits and latent cache ----------------------------------------------------------------

def test_digits_split_and_loader():
    train, test, labels = D.load_digits_split(holdout=0.2)
    assert train.shape == (1438, 8, 8, 1) and test.shape == (359, 8, 8, 1)
    assert train.dtype == test.dtype == np.uint8 and labels.dtype == np.int32
    assert train.max() == 255 and train.min() == 0 and labels.shape == (1438,)
    again = D.load_digits_split(holdout=0.2)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(test, D.load_digits_split(holdout=0.2, seed=1)[1])
    assert D.load_digits_split(holdout=297)[1].shape == (297, 8, 8, 1)
    cfg = _cfg(kind="digits", image_size=8)
    batch = next(iter(D.make_train_loader(cfg, global_batch=64, seed=0, process_index=0,
                                          process_count=1)))
    assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    ev = _eval_all(cfg)
    np.testing.assert_array_equal(ev["image"][ev["mask"]], train)
    with pytest.raises(ValueError, match="digits are 8x8"):
        D.make_train_loader(_cfg(kind="digits"), global_batch=8, seed=0, process_index=0,
                            process_count=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_cache_yields_a_random_flip_per_sample(tmp_path, dtype):
    n = 12
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(n, 2, 2, 2, 3)).astype(np.float32)
    cls = rng.normal(size=(n, 2, 5)).astype(np.float32)
    D.write_latent_cache(str(tmp_path / "cache"), lat, cls, np.arange(n) % 3, dtype=dtype)
    cfg = _cfg(kind="latent_cache", latent_cache=str(tmp_path / "cache"))
    loader = D.make_train_loader(cfg, global_batch=4, seed=1, process_index=0,
                                 process_count=1, num_epochs=2)
    stored = np.asarray(lat.astype(D.LatentCacheSource(str(tmp_path / "cache"))[0]["latents"]
                                   .dtype), np.float32)
    chosen = []
    for b in loader:
        assert b["latents"].shape == (4, 2, 2, 3) and b["cls"].shape == (4, 5)
        for latent in np.asarray(b["latents"], np.float32):
            match = [(k, f) for k in range(n) for f in range(2)
                     if np.array_equal(stored[k, f], latent)]
            assert len(match) == 1
            chosen.append(match[0])
    assert sorted(k for k, _ in chosen) == sorted(list(range(n)) * 2)
    for i, (k, f) in enumerate(chosen):
        assert f == D.flip_decision(D.record_rng(1, k, i // n))
    assert {f for _, f in chosen} == {0, 1}
    os.remove(tmp_path / "cache" / "meta.json")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        D.LatentCacheSource(str(tmp_path / "cache"))
