"""Fixtures shared by the cryo-EM tests."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def blobs24() -> np.ndarray:
    """Nine Gaussian blobs at random places in a 24³ box: no symmetry, so every pose is identifiable."""
    rng = np.random.default_rng(0)
    grid = np.arange(24) - 12
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    volume = np.zeros((24,) * 3)
    for (cx, cy, cz), width, height in zip(rng.uniform(-6, 6, (9, 3)), rng.uniform(1.0, 2.0, 9),
                                           rng.uniform(0.5, 1.5, 9)):
        volume += height * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * width**2))
    return volume.astype(np.float32)
