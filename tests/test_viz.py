"""Sample pictures: image grids keep pixel values, small images are enlarged, point densities land where points are."""

from __future__ import annotations

import numpy as np
import torch

from lit_gen.viz import image_grid, points_picture, samples_picture, save_png


def test_image_grid_keeps_pixels_and_enlarges_tiny_images(tmp_path) -> None:  # type: ignore[no-untyped-def]
    images = torch.zeros(4, 1, 8, 8)
    images[0, 0, 0, 0] = 255.0
    grid = image_grid(images, nrow=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 32 + 3, 2 * 32 + 3, 3)
    assert (grid[1:5, 1:5] == 255).all() and grid[1 + 4, 1 + 4].max() == 0  # one pixel became a 4x4 block
    rgb = image_grid(torch.full((2, 3, 32, 32), 300.0))  # clamped to 255, no enlargement at 32 px
    assert rgb.shape == (32 + 2, 2 * 32 + 3, 3) and rgb[1, 1].tolist() == [255, 255, 255]
    assert save_png(grid, tmp_path / "g.png").stat().st_size > 0


def test_points_picture_is_bright_where_the_points_are() -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal((-5, 0), 0.1, (5000, 2)), rng.normal((5, 0), 0.1, (500, 2))])
    picture = points_picture(points, size=100)
    assert picture.shape == (100, 100, 3)
    left, right, middle = picture[:, :20, 0].max(), picture[:, -20:, 0].max(), picture[:, 40:60, 0].max()
    assert left == 255 and 0 < right < 255 and middle == 0
    assert samples_picture(torch.tensor(points), "points").shape == (256, 256, 3)
