"""Scene-aware splitting keeps near-duplicate images on one side of the split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from springfield.data.index import (
    MIN_VAL_IMAGES,
    load_splits,
    scan_folder,
    stratified_split,
)


def _scene(path, rng, base):
    # A "scene": one background colour with a small moving square, i.e. near-identical frames.
    img = np.full((48, 64, 3), base, np.uint8)
    x = rng.integers(0, 50)
    img[10:20, x : x + 8] = 255 - np.array(base, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, "JPEG", quality=95)


def test_group_split_never_separates_frames_of_one_scene(tmp_path):
    rng = np.random.default_rng(0)
    scenes = {}
    for cls in ("bart", "homer"):
        for s in range(8):
            base = tuple(int(v) for v in rng.integers(0, 256, 3))
            for f in range(4):
                p = tmp_path / cls / f"s{s}_f{f}.jpg"
                _scene(p, rng, base)
                scenes[str(p)] = (cls, s)
    train, val = load_splits(tmp_path, val_fraction=0.25, seed=0, group_threshold=20.0)
    assert len(train) + len(val) == 64
    train_scenes = {scenes[p] for p in train.paths}
    val_scenes = {scenes[p] for p in val.paths}
    assert train_scenes.isdisjoint(val_scenes)
    assert val.counts() == {"bart": 8, "homer": 8}  # two whole scenes per class
    # A plain random split of the same folder mixes scenes: the reason for the option.
    plain_train, plain_val = stratified_split(scan_folder(tmp_path), 0.25, seed=0)
    assert {scenes[p] for p in plain_train.paths} & {scenes[p] for p in plain_val.paths}
    again, _ = load_splits(tmp_path, val_fraction=0.25, seed=0, group_threshold=20.0)
    assert again.paths == train.paths


def _class_of(root, cls, n, rng):
    for i in range(n):
        base = tuple(int(v) for v in rng.integers(0, 256, 3))  # every image its own scene
        _scene(root / cls / f"{i}.jpg", rng, base)


def test_a_class_too_small_to_split_is_refused_by_name(tmp_path):
    from springfield.errors import SpringfieldError

    rng = np.random.default_rng(1)
    _class_of(tmp_path, "bart", 12, rng)
    _class_of(tmp_path, "maggie", 3, rng)
    for threshold in (None, 20.0):
        with pytest.raises(SpringfieldError, match=r"class maggie: only 3 image\(s\).*at least 5"):
            load_splits(tmp_path, val_fraction=0.2, seed=0, group_threshold=threshold)


def test_a_small_class_still_gets_a_few_validation_images(tmp_path):
    rng = np.random.default_rng(2)
    _class_of(tmp_path, "bart", 40, rng)
    _class_of(tmp_path, "maggie", 6, rng)  # 6 x 0.2 rounds to 1: raised to MIN_VAL_IMAGES
    for threshold in (None, 20.0):
        train, val = load_splits(tmp_path, val_fraction=0.2, seed=0, group_threshold=threshold)
        assert val.counts() == {"bart": 8, "maggie": MIN_VAL_IMAGES}
        assert train.counts() == {"bart": 32, "maggie": 6 - MIN_VAL_IMAGES}
        assert set(train.paths).isdisjoint(val.paths)


def test_a_class_that_is_one_scene_cannot_be_split_by_scene(tmp_path):
    from springfield.errors import SpringfieldError

    rng = np.random.default_rng(3)
    _class_of(tmp_path, "bart", 12, rng)
    base = (40, 120, 200)
    for f in range(8):  # eight frames of one scene: a single group
        _scene(tmp_path / "maggie" / f"f{f}.jpg", rng, base)
    # A plain split works; the scene-aware split cannot hold out a whole scene and keep one.
    load_splits(tmp_path, val_fraction=0.2, seed=0)
    with pytest.raises(SpringfieldError, match="class maggie: its 8 images look like too few"):
        load_splits(tmp_path, val_fraction=0.2, seed=0, group_threshold=20.0)
