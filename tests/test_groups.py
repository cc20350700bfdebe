"""Scene-aware splitting keeps near-duplicate images on one side of the split."""

from __future__ import annotations

import numpy as np
from PIL import Image

from springfield.data.index import load_splits, scan_folder, stratified_split


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
