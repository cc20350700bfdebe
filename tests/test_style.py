"""Drawing-style augmentations: shape and dtype kept, seeded, and each one changes the image."""

from __future__ import annotations

import numpy as np
import pytest

from springfield.data.augment import STYLES, Augment, make_augment, stylise
from springfield.data.decode import load_rgb


@pytest.fixture(scope="module")
def portrait(tiny_folder) -> np.ndarray:
    path = sorted((tiny_folder / "marge_simpson").iterdir())[0]
    return load_rgb(path, size=(40, 48))


@pytest.mark.parametrize("kind", STYLES)
def test_each_style_keeps_shape_and_dtype_changes_pixels_and_is_seeded(portrait, kind):
    out = stylise(portrait, np.random.default_rng(0), kind)
    assert out.shape == portrait.shape and out.dtype == np.uint8
    assert np.mean(out != portrait) > 0.01, kind  # it did something
    # ... but the picture is still the picture: mean colour within a modest distance.
    assert np.abs(out.astype(float).mean((0, 1)) - portrait.astype(float).mean((0, 1))).max() < 40
    again = stylise(portrait, np.random.default_rng(0), kind)
    np.testing.assert_array_equal(out, again)


def test_hue_turns_stay_within_the_limit(portrait):
    from PIL import Image

    hue = np.asarray(Image.fromarray(portrait).convert("HSV"))[..., 0].astype(int)
    for seed in range(10):
        out = stylise(portrait, np.random.default_rng(seed), "hue")
        turned = np.asarray(Image.fromarray(out).convert("HSV"))[..., 0].astype(int)
        saturated = np.asarray(Image.fromarray(portrait).convert("HSV"))[..., 1] > 80
        diff = (turned - hue + 128) % 256 - 128
        # Round trips through RGB move a hue by a level or two; the turn itself <= 20 deg.
        assert np.abs(np.median(diff[saturated])) <= 20 / 360 * 256 + 2


def test_style_in_the_augment_is_seeded_and_absent_when_zero(portrait):
    element = {"image": portrait, "label": np.int32(0)}
    aug = make_augment("light", style=1.0)
    a = aug(element, np.random.default_rng(5))["image"]
    b = aug(element, np.random.default_rng(5))["image"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == portrait.shape and a.dtype == np.uint8
    # style=0 draws nothing from the stream: the same image as the preset without it.
    plain = make_augment("light")(element, np.random.default_rng(5))["image"]
    zero = Augment(flip=True, crop_scale=(0.7, 1.0), jitter=0.1, style=0.0)
    np.testing.assert_array_equal(zero(element, np.random.default_rng(5))["image"], plain)
    assert not np.array_equal(a, plain)
