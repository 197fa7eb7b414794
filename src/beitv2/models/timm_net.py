"""A timm network by name as a model kind of this project: the stand-in teacher a small-image run trains itself.

A ViT from scratch learns Fashion-MNIST slowly (a 4-block ViT: 67% test accuracy after one epoch on all 60,000
labels), a small CNN fast (timm's ``resnet10t`` at a quarter of its width: 88% after 300 steps of 128). The
BEiT v2 paper distils CLIP or DINO; where no such weights can be had, a CNN trained on labels here is a far
stronger teacher for the same compute. With ``output_stride: 8`` on 56 px inputs (28 px images resized) its last
feature map is 7 x 7: one feature per 4 px patch of the tokenizer grid.

The model takes [0, 1] images of any size and resizes and normalises them itself (`beitv2.utils.imaging.fit_input`,
the same function the frozen-teacher adapter applies), so training and distillation see identical inputs. Its
state dict is timm's, under ``net.``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import check, opt
from ..utils.imaging import fit_input


@dataclass
class TimmNetConfig:
    name: str = opt("resnet10t", "timm model name (built with pretrained=False: the weights are this file's)")
    num_classes: int = opt(10, "classifier outputs (0 = features only)")
    in_chans: int = opt(1, "input channels")
    img_size: int = opt(56, "input resolution: images are resized to it (bicubic, antialiased)")
    mean: tuple[float, ...] = opt((0.485,), "input normalisation mean, one value per channel")
    std: tuple[float, ...] = opt((0.229,), "input normalisation std, one value per channel")
    model_kwargs: dict = field(default_factory=lambda: {"channels": [32, 48, 64, 96], "output_stride": 8},
                               metadata={"help": "extra timm.create_model arguments"})

    def validate(self, prefix: str = "") -> None:
        check(self.img_size > 0, f"{prefix}img_size", "must be > 0")
        check(len(self.mean) == len(self.std) == self.in_chans, f"{prefix}mean",
              f"mean and std need in_chans={self.in_chans} values, got {len(self.mean)} and {len(self.std)}")
        check(all(s > 0 for s in self.std), f"{prefix}std", "must be positive")


class TimmNet(nn.Module):
    """``forward(images01) -> logits``; ``forward_features(images01) -> [B, C, h, w]`` (timm's last feature map)."""

    def __init__(self, config: TimmNetConfig):
        import timm

        super().__init__()
        config.validate()
        self.config = config
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_kwargs.items()}
        self.net = timm.create_model(config.name, pretrained=False, num_classes=config.num_classes,
                                     in_chans=config.in_chans, **kwargs)
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        return fit_input(images01, (self.config.img_size,) * 2, self._mean, self._std)

    def forward_features(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.preprocess(images01))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images01))
