"""Pictures of samples: an image grid, or a 2-D density picture for point data (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int | None = None, min_size: int = 32) -> np.ndarray:
    """uint8 HxWxC grid of images given in pixel units [0, 255] (N, C, H, W); images smaller than ``min_size``
    pixels are enlarged by an integer factor (nearest neighbour) so tiny data such as 8x8 digits stays visible."""
    images = images.detach().float().clamp(0, 255).round().to(torch.uint8).cpu()
    factor = max(1, min_size // images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0)  # (C, H, W) uint8; 1 channel is repeated to 3
    return grid.permute(1, 2, 0).numpy()


def points_picture(points: torch.Tensor | np.ndarray, size: int = 256, extent: float | None = None) -> np.ndarray:
    """uint8 HxWx3 log-density picture of 2-D points (first two coordinates), centred on the data."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    p = p[np.isfinite(p).all(axis=1)]
    if len(p) == 0:
        return np.zeros((size, size, 3), np.uint8)
    low, high = np.quantile(p, 0.002, axis=0), np.quantile(p, 0.998, axis=0)
    centre = (low + high) / 2
    half = extent if extent is not None else max(1e-6, float((high - low).max()) / 2 * 1.15)
    hist, _, _ = np.histogram2d(
        p[:, 1], p[:, 0], bins=size, range=[[centre[1] - half, centre[1] + half], [centre[0] - half, centre[0] + half]]
    )
    density = np.log1p(hist[::-1])  # y axis up
    density = density / max(density.max(), 1e-12)
    r = (255 * density).astype(np.uint8)
    return np.stack([r, (255 * density**0.5).astype(np.uint8), np.full_like(r, 32)], axis=-1)


def samples_picture(samples: torch.Tensor, kind: str) -> np.ndarray:
    """The picture for samples as ``LoadedModel.sample`` returns them: an image grid for images and for latents
    (which it returns decoded to pixels by their VAE), else a point density."""
    return image_grid(samples) if kind in ("image", "latent") else points_picture(samples)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path
