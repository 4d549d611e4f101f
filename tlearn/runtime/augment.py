"""Training augmentation and test-time augmentation, both built from the model's data config
(so they agree with preprocess.eval_transform on size, interpolation and normalisation).

--augment
  none      the eval transform (resize, centre crop)
  flip      the eval transform + random horizontal flip
  light     random-resized crop + horizontal flip (AlexNet's recipe), via timm
  standard  light + colour jitter 0.4, via timm

--tta
  none      the eval transform
  flip      the eval transform and its mirror image
  10crop    the four corners and the centre of the resized image, and their mirrors
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from tlearn.core.options import check_augment, check_tta
from tlearn.data.pixels import AspectGuard, resize_target
from tlearn.runtime.transforms import eval_transform

LIGHT_SCALE = (0.25, 1.0)


def train_transform(data_config: dict, augment: str):
    """The transform for training images."""

    import timm.data  # timm's training transforms; torch is loaded by then anyway

    check_augment(augment)
    if augment == "none":
        return eval_transform(data_config)
    if augment == "flip":
        return T.Compose([T.RandomHorizontalFlip(0.5), eval_transform(data_config)])
    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=True,
        scale=LIGHT_SCALE if augment == "light" else None,
        hflip=0.5,
        color_jitter=0.4 if augment == "standard" else None,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )


class _Views:
    """PIL image -> (V, C, H, W) tensor of test-time views."""

    def __init__(self, data_config: dict, tta: str):
        self.tta = check_tta(tta)
        self.eval = eval_transform(data_config)
        size = tuple(data_config["input_size"][1:])
        interp = T.InterpolationMode(
            data_config["interpolation"]
            if data_config["interpolation"] in ("bilinear", "bicubic", "nearest")
            else "bilinear"
        )
        self.resize = T.Resize(resize_target(data_config), interpolation=interp)
        self.guard = AspectGuard(resize_target(data_config))
        self.ten = T.TenCrop(size)
        self.finish = T.Compose(
            [T.ToTensor(), T.Normalize(mean=data_config["mean"], std=data_config["std"])]
        )

    def __call__(self, img) -> torch.Tensor:
        if self.tta == "none":
            return self.eval(img).unsqueeze(0)
        if self.tta == "flip":
            x = self.eval(img)
            return torch.stack([x, x.flip(-1)])
        # torchvision's TenCrop: four corners + centre, then the same of the mirror image.
        img = self.guard(img)  # T.Resize makes the whole resized image: bound it
        return torch.stack([self.finish(c) for c in self.ten(self.resize(img))])


def tta_transform(data_config: dict, tta: str):
    """A transform that returns all views of one image stacked: (V, C, H, W)."""
    return _Views(data_config, tta)


def n_views(tta: str) -> int:
    return {"none": 1, "flip": 2, "10crop": 10}[check_tta(tta)]
