"""The one tile format: uint8 (N, H, W, 3) on disk, float (N, 3, H, W) in [0, 1] for models."""

import numpy as np
import torch

from stmdit.tiles import to_tensor, to_uint8


def test_round_trip_is_exact():
    tiles = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 3), dtype=np.uint8)
    x = to_tensor(tiles)
    assert x.shape == (3, 3, 5, 4) and x.dtype == torch.float32
    assert np.array_equal(to_uint8(x), tiles)
    assert np.array_equal(to_uint8(x.permute(0, 2, 3, 1).numpy()), tiles)  # channels-last array


def test_values_by_hand():
    # 0.5 * 255 = 127.5 rounds to the even level 128 (torch and numpy agree); out of range clips.
    x = torch.tensor([-0.2, 0.0, 0.5, 1 / 255, 1.0, 1.7]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 1, 255, 255]
    assert to_uint8(np.array([[[0.25, 0.75, 2.0]]]))[0, 0].tolist() == [64, 191, 255]
    single = to_tensor(np.full((2, 2, 3), 51, np.uint8))
    assert single.shape == (1, 3, 2, 2) and torch.allclose(single, torch.full_like(single, 0.2))
