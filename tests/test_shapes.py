"""segtokens.shapes: the generated masks the VQ-VAE trains on, thin-water kinds included."""

import numpy as np
import pytest
from scipy import ndimage

from paligemma_seg.segtokens import shapes

SIZE = (96, 120)


@pytest.mark.parametrize("name", sorted(shapes.GENERATORS))
def test_every_generator_draws_a_bool_mask_of_the_asked_size(name):
    rng = np.random.default_rng(0)
    masks = [shapes.GENERATORS[name](rng, SIZE) for _ in range(8)]
    assert all(m.shape == SIZE and m.dtype == bool for m in masks)
    assert any(m.any() for m in masks)


def _thin_fraction(mask: np.ndarray) -> float:
    """Share of the water within 1.5 px of land: ~1 for 1-3 px wide channels, ~0 for big lakes."""
    inside = ndimage.distance_transform_edt(np.pad(mask, 1, constant_values=True))[1:-1, 1:-1]
    return float((inside[mask] <= 1.5).mean()) if mask.any() else 0.0


def test_thin_water_kinds_are_thin_or_fragmented():
    rng = np.random.default_rng(1)
    networks = [shapes.river_network(rng, SIZE) for _ in range(12)]
    lakes = [shapes.lake(rng, SIZE) for _ in range(12)]
    assert np.mean([_thin_fraction(m) for m in networks]) > 0.5
    assert np.mean([_thin_fraction(m) for m in lakes]) < 0.2
    specks = [shapes.specks(rng, SIZE) for _ in range(12)]
    assert np.median([ndimage.label(m)[1] for m in specks]) >= 5
    reservoirs = [shapes.reservoir(rng, SIZE) for _ in range(12)]
    # arms reach out of the lake: more thin water than the lake alone
    assert np.mean([_thin_fraction(m) for m in reservoirs]) > np.mean(
        [_thin_fraction(m) for m in lakes]
    )


def test_random_mask_draws_only_the_weighted_kinds():
    rng = np.random.default_rng(2)
    for _ in range(10):  # all water, or land with one pixel of water
        mask = shapes.random_mask(rng, {"full_or_empty": 1.0})
        assert 24 <= min(mask.shape) and max(mask.shape) <= 192
        assert mask.all() or mask.sum() == 1
    # The default mix is WEIGHTS, without the thin-water kinds (tests and data are seeded on it).
    a = [shapes.random_mask(np.random.default_rng(s)) for s in range(5)]
    b = [shapes.random_mask(np.random.default_rng(s), shapes.WEIGHTS) for s in range(5)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not {"river_network", "reservoir", "coastline", "specks"} & set(shapes.WEIGHTS)
    assert set(shapes.THIN_WATER_WEIGHTS) <= set(shapes.GENERATORS)
