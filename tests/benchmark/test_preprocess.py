"""Resize and normalisation match the paper's torchvision pipeline and the official Meta-Dataset decoder."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from benchmark.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from registry.catalog import get_source


def reference_bilinear_align_corners(image, size):
    """Numpy bilinear resize with source coordinate i·(H−1)/(s−1): the official ``align_corners=True``."""
    h, w, _ = image.shape
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).transpose(2, 0, 1)


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)  # H=200, W=300: not square


def test_squash_keeps_the_whole_image_as_official_bilinear_align_corners(photo):
    pre = Preprocess(84, "squash", "unit_range")
    out = pre.resized(photo)
    expected = reference_bilinear_align_corners(photo, 84)
    assert out.shape == (3, 84, 84)
    assert np.abs(pre(photo).numpy() - (expected / 127.5 - 1)).max() < 1e-4  # in the network's [-1, 1] units
    assert torch.equal(out[:, 0, 0], torch.tensor(photo[0, 0], dtype=torch.float32))  # corners map to corners
    assert torch.equal(out[:, -1, -1], torch.tensor(photo[-1, -1], dtype=torch.float32))


def test_center_crop_equals_the_papers_torchvision_pipeline(photo):
    paper = transforms.Compose([
        transforms.Resize(int(128 * 256 / 224)), transforms.CenterCrop(128), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    expected = paper(Image.fromarray(photo))
    out = Preprocess(128, "center_crop", "imagenet")(photo)
    assert out.shape == expected.shape == (3, 128, 128)
    assert torch.allclose(out, expected, atol=1e-5)


def test_unit_range_maps_0_to_minus_one_and_255_to_one():
    pre = Preprocess(4, "squash", "unit_range")
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    assert torch.all(pre(black) == -1) and torch.all(pre(white) == 1)


def test_benchmark_profile_official_overrides_every_source():
    sketch = get_source("sketch")
    assert Preprocess.for_source(sketch) == Preprocess(224, "center_crop", "imagenet")
    assert Preprocess.for_source(sketch, "official") == Preprocess(224, "squash", "unit_range")
    assert Preprocess.for_source(get_source("aircraft")).image_size == 128


def test_unknown_resize_is_rejected():
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess(32, "stretch", "imagenet")
