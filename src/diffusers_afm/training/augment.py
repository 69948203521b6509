"""Augmentations: the discriminator's and the guidance classifier's (docs/method.md).

Discriminator (`augment_pair`; "Training recipe", p = 0.4 in the guided phase): a random integer
translation of up to 30% of the height and width, then three random erasings of 10-50% of the area
each. Each of these four operations is applied to each sample with its own probability-`p` draw,
as the reference trainer does: at p = 0.4 a sample is left untouched with probability
0.6^4 = 0.13, not 0.6. The i-th real and the i-th fake sample get the SAME transform, so that a
relativistic pair differs in its content, never in its augmentation.

Classifier (`random_affine`; "Classifier guidance", p = 0.8): a random rotation, zoom and shift.
"""

import math
from typing import Optional, Tuple

import torch

# Aspect ratios (height / width) of the erased rectangles are log-uniform in this range.
ERASING_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def _uniform(low: float, high: float, size: int, like: torch.Tensor, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, device=like.device, generator=generator)


def translate(images: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, `(shift_y[i], shift_x[i])`; vacated pixels become 0.

    Zero padding, not edge replication: 0 is about the mean of scaled VAE latents and of images in
    [-1, 1], and it is the value the erasings write too.
    """
    batch_size, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device) - shift_y[:, None]  # (N, H): source row
    cols = torch.arange(width, device=images.device) - shift_x[:, None]  # (N, W): source column
    inside = ((rows >= 0) & (rows < height))[:, None, :, None] & ((cols >= 0) & (cols < width))[:, None, None, :]
    rows = rows.clamp(0, height - 1)[:, None, :, None].expand(batch_size, channels, height, width)
    cols = cols.clamp(0, width - 1)[:, None, None, :].expand(batch_size, channels, height, width)
    shifted = images.gather(2, rows).gather(3, cols)
    return shifted.masked_fill(~inside, 0.0)  # (N, C, H, W)


def erasing_mask(
    batch_size: int,
    height: int,
    width: int,
    area: Tuple[float, float],
    like: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A (N, 1, H, W) boolean mask of one random rectangle per sample, covering about `area` of it.

    The rectangle's side is clamped to the image, so a very elongated draw covers a bit less.
    """
    target_area = _uniform(*area, batch_size, like, generator) * height * width
    aspect_ratio = torch.exp(_uniform(*ERASING_LOG_RATIO, batch_size, like, generator))
    box_h = (target_area * aspect_ratio).sqrt().round().clamp(1, height).long()
    box_w = (target_area / aspect_ratio).sqrt().round().clamp(1, width).long()
    top = (torch.rand(batch_size, device=like.device, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(batch_size, device=like.device, generator=generator) * (width - box_w + 1)).long()
    rows = torch.arange(height, device=like.device)[None, :]  # (1, H)
    cols = torch.arange(width, device=like.device)[None, :]  # (1, W)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)


def augment_pair(
    real: torch.Tensor,
    fake: torch.Tensor,
    p: float,
    translation: float = 0.3,
    num_erasing: int = 3,
    erasing_area: Tuple[float, float] = (0.1, 0.5),
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Augment `(real, fake)`, both (N, C, H, W), with the same random transform per sample pair.

    Each sample pair is translated by whole pixels (up to `translation` of H in y and of W in x,
    independently; zero padding) with probability `p`, then each of `num_erasing` rectangles of
    `erasing_area` of the image is set to 0 with probability `p`: every operation has its own
    per-sample draw. `p = 0` returns the inputs themselves.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be in [0, 1], got {p!r}.")
    if real.shape != fake.shape:
        shapes = f"{tuple(real.shape)} and {tuple(fake.shape)}"
        raise ValueError(f"`real` and `fake` must have the same shape, got {shapes}.")
    if p == 0.0:
        return real, fake
    batch_size, channels, height, width = real.shape
    # Real and fake travel together along the channels, so every draw below applies to both.
    images = torch.cat([real, fake], dim=1)  # (N, 2C, H, W)

    def coin() -> torch.Tensor:  # (N,): one independent probability-p draw per sample
        return torch.rand(batch_size, device=real.device, generator=generator) < p

    translate_on = coin()
    max_y, max_x = round(translation * height), round(translation * width)
    shift_y = torch.randint(-max_y, max_y + 1, (batch_size,), device=real.device, generator=generator)
    shift_x = torch.randint(-max_x, max_x + 1, (batch_size,), device=real.device, generator=generator)
    images = translate(images, shift_y * translate_on, shift_x * translate_on)

    for _ in range(num_erasing):
        erase_on = coin()
        mask = erasing_mask(batch_size, height, width, erasing_area, real, generator)
        images = images.masked_fill(mask & erase_on[:, None, None, None], 0.0)
    return images[:, :channels], images[:, channels:]


def random_affine(
    images: torch.Tensor,
    p: float,
    max_rotation: float = 15.0,
    scale: Tuple[float, float] = (0.9, 1.1),
    translation: float = 0.1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A random affine transform of each image with probability `p` (the classifier's augmentation).

    docs/method.md gives only `p = 0.8`; the ranges are ours: a rotation of up to `max_rotation` degrees,
    an isotropic scale in `scale`, a translation of up to `translation` of the side in x and y.
    Bilinear resampling with zero padding; the images left alone are returned bit for bit.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be in [0, 1], got {p!r}.")
    if p == 0.0:
        return images
    batch_size = images.shape[0]
    apply = torch.rand(batch_size, device=images.device, generator=generator) < p  # (N,)
    angle = math.radians(max_rotation) * (2 * torch.rand(batch_size, device=images.device, generator=generator) - 1)
    zoom = _uniform(*scale, batch_size, images, generator)
    # affine_grid works in [-1, 1] coordinates, where the whole side has length 2.
    shift = 2 * translation * (2 * torch.rand(batch_size, 2, device=images.device, generator=generator) - 1)
    # theta maps output coordinates to where they are read in the input, hence 1 / zoom (a zoom
    # above 1 enlarges the content); the shift is symmetric, so its sign needs no care.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, sin, shift[:, 0]], -1), torch.stack([-sin, cos, shift[:, 1]], -1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(apply[:, None, None, None], warped, images)
