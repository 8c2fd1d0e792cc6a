"""The complexity features and the handcrafted score rank images by how busy they are."""

from __future__ import annotations

import numpy as np

from pipeline.score import GRID, HandcraftedScorer, complexity_features

SIZE = 64


def _images() -> np.ndarray:
    flat_grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0] = 255
    yy, xx = np.mgrid[:SIZE, :SIZE]
    checker = np.where(((yy // 4 + xx // 4) % 2)[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2)
    return np.stack([flat_grey, red, checker])


def test_features_measure_gradients_edges_and_saturation():
    features = complexity_features(_images(), np.array([0.1, 0.1, 2.0], np.float32))
    assert features.shape == (3, 6 + GRID * GRID + 4)
    flat, red, checker = features
    np.testing.assert_allclose(flat[[0, 1, 3, 4, 5]], 0.0, atol=1e-4)  # no gradient, edge, spread, colour
    np.testing.assert_allclose(red[4], 255.0)  # fully saturated everywhere
    np.testing.assert_allclose(red[5], 0.0, atol=1e-3)
    assert checker[0] > 50 and checker[1] > 0.4 and checker[3] > 100  # busy: strong gradients and edges
    cells = 6 + GRID * GRID
    np.testing.assert_allclose(checker[6:cells], checker[0], rtol=0.2)  # the busyness is spread over the grid
    assert checker[2] == np.float32(2.0)
    # patch redundancy: flat images are all flat, alike patches; 4-px checks make every patch busy
    np.testing.assert_allclose(flat[cells:], [1.0, 1.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(red[cells : cells + 2], 1.0)
    assert checker[cells] == 0.0 and checker[cells + 1] == 0.0 and checker[cells + 2] > 100


def test_handcrafted_score_orders_flat_below_busy():
    scores = HandcraftedScorer()(complexity_features(_images(), np.array([0.1, 0.1, 2.0], np.float32)))
    assert scores[0] < 0.05 and scores[2] > 0.9 and np.all((scores >= 0) & (scores < 1))
