"""Whole-batch data augmentation that runs on the device holding the batch.

The datasets of :mod:`ksam.lab.tasks` live on the training device as one tensor, so the
augmentation must work on a whole batch there too: a per-example Python loop (or a
CPU ``DataLoader``) would dominate the step time of the small models used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(
    x: Tensor, padding: int, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Random crop of the zero-padded images plus an optional random horizontal flip.

    Each output image ``i`` equals ``pad(x[i])[:, dy:dy+H, dx:dx+W]`` with ``dy, dx`` drawn
    uniformly in ``[0, 2*padding]``, then mirrored left-right with probability 1/2 when
    ``flip``. Done with two ``gather`` calls, so it is exact and has no loop over examples.

    Args:
        x: images ``[N, C, H, W]`` (any float dtype, any device).
        padding: zero padding on every side, i.e. the largest shift in pixels.
        flip: also flip horizontally with probability 1/2.
        generator: a ``torch.Generator`` on ``x.device`` (``None``: the global one), so that
            runs are reproducible without touching the global RNG.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects [N, C, H, W] images, got {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    if n == 0 or (padding == 0 and not flip):
        return x.clone()
    dev = x.device
    shifts = torch.randint(0, 2 * padding + 1, (2, n), device=dev, generator=generator)
    rows = shifts[0, :, None] + torch.arange(h, device=dev)  # [N, H] rows of the padded image
    cols = shifts[1, :, None] + torch.arange(w, device=dev)  # [N, W]
    if flip:
        flipped = torch.randint(0, 2, (n,), device=dev, generator=generator).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    wp = padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


class RandomCropFlip:
    """``Task.augment`` callable: ``aug(x, generator)`` applies :func:`random_crop_flip`.

    A class rather than a lambda so that it has a readable repr and can be pickled.
    """

    def __init__(self, padding: int, flip: bool = True) -> None:
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return random_crop_flip(x, self.padding, flip=self.flip, generator=generator)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"
