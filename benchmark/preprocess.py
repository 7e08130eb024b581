"""Decoded image -> network input: resize to a square and normalise, as a source declares.

Two resizes (``resize`` in ``registry/sources.toml``):

* ``center_crop`` (the paper's code, torchvision on PIL): shorter side to ``int(s · 256 / 224)``
  with PIL bilinear (antialiased), then a centred ``s × s`` crop. Aspect ratio kept, borders lost.
* ``squash`` (official Meta-Dataset ``ImageDecoder``): the whole image bilinearly to ``s × s`` with
  ``align_corners=True`` and no antialiasing, i.e. source pixel ``i · (H − 1) / (s − 1)``.

Two normalisations (``normalization``):

* ``imagenet``: ``(x / 255 − mean) / std`` with ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225).
* ``unit_range``: ``2 · (x / 255 − 0.5)`` in [−1, 1].
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from registry.catalog import NORMALIZATIONS, RESIZES

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """``uint8 H×W×3`` RGB array -> ``float32 3×s×s`` tensor.

    Example:
        >>> pre = Preprocess(image_size=128, resize="center_crop", normalization="imagenet")
        >>> pre(np.zeros((300, 200, 3), np.uint8)).shape
        torch.Size([3, 128, 128])
    """

    image_size: int
    resize: str = "center_crop"
    normalization: str = "imagenet"

    def __post_init__(self):
        if self.resize not in RESIZES or self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Preprocess(resize={self.resize!r}, normalization={self.normalization!r}): "
                f"resize must be one of {RESIZES}, normalization one of {NORMALIZATIONS}"
            )

    @classmethod
    def for_source(cls, source, profile="paper"):
        """The preprocessing of a `registry.catalog.Source` under a benchmark's ``preprocessing``.

        ``paper`` keeps the source's own declaration; ``official`` squashes to the source's size and
        maps to [−1, 1] for every source.
        """
        if profile == "official":
            return cls(source.image_size, "squash", "unit_range")
        return cls(source.image_size, source.resize, source.normalization)

    def resized(self, image):
        """The resized image as a float32 ``3×s×s`` tensor of grey levels in [0, 255]."""
        size = self.image_size
        if self.resize == "center_crop":
            pil = Image.fromarray(image)
            pil = TF.center_crop(TF.resize(pil, int(size * 256 / 224)), [size, size])
            return torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=True, antialias=False)[0]

    def normalize(self, pixels):
        """Grey levels in [0, 255] (``3×s×s``, or a batch ``N×3×s×s``) -> the network's input range, elementwise."""
        if self.normalization == "unit_range":
            return pixels / 127.5 - 1.0
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
        return (pixels / 255.0 - mean) / std

    def __call__(self, image):
        return self.normalize(self.resized(image))
