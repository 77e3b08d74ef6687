"""Generated tiles: deterministic by seed, masks exactly where water shows, the water data set's layout."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from paligemma_seg.data import synthetic
from paligemma_seg.data.synthetic import __main__ as synthetic_cli


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_by_seed(tmp_path):
    first = synthetic.generate(tmp_path / "a", num_images=6, size=48, seed=3)
    synthetic.generate(tmp_path / "b", num_images=6, size=48, seed=3)
    synthetic.generate(tmp_path / "c", num_images=3, size=48, seed=3)
    synthetic.generate(tmp_path / "d", num_images=6, size=48, seed=4)
    a, b, c, d = (_files(tmp_path / x) for x in "abcd")
    assert first == [f"synth_{i:05d}.jpg" for i in range(6)]
    assert a == b
    images = [k for k in a if k.parts[0] in ("images", "masks")]
    assert all(c[k] == a[k] for k in c if k.parts[0] in ("images", "masks"))  # tile i ignores num
    assert sum(a[k] != d[k] for k in images) >= 10  # another seed, other tiles


def test_generate_layout_and_exact_masks(tmp_path):
    synthetic.generate(tmp_path, num_images=20, size=64, seed=0)
    test = (tmp_path / "test_images.txt").read_text().split()
    train = (tmp_path / "train_images.txt").read_text().split()
    assert test == ["synth_00009.jpg", "synth_00019.jpg"] and len(train) == 18
    for index in (0, 9, 13):
        image, mask = synthetic.render_tile(0, index, 64)
        name = synthetic.tile_name(index)
        written_mask = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
        np.testing.assert_array_equal(written_mask, mask.astype(np.uint8) * 255)
        written = np.asarray(Image.open(tmp_path / "images" / f"{name}.jpg"), np.float32)
        assert written.shape == (64, 64, 3)
        assert np.abs(written - image).mean() < 4  # JPEG quality 92


def _edge_band(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of the mask's boundary (where the optical blur may tip them)."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def test_masks_are_where_water_shows():
    """Recolouring the water changes exactly the masked pixels (clouds over 0.5 opacity hide it),
    except within a pixel of a shore or of a cloud's 0.5-opacity contour."""
    size, checked_pixels = 96, 0
    for index in range(30):
        layers = synthetic.draw_layers(np.random.default_rng([7, index, size]), size)
        layers = dataclasses.replace(layers, shadow=np.zeros_like(layers.shadow))
        recoloured = dataclasses.replace(layers, water_colour=layers.water_colour + 0.3)
        change = np.abs(
            synthetic.compose(recoloured).astype(np.float32) - synthetic.compose(layers)
        ).mean(-1)
        changed = change > 0.5 * 0.3 * 255 * layers.brightness * (1 - layers.haze)
        edges = _edge_band(layers.water) | _edge_band(layers.cloud > synthetic.CLOUD_MASK_OPACITY)
        assert not ((changed != layers.mask) & ~edges).any(), index
        checked_pixels += int((layers.mask & ~edges).sum())
    assert checked_pixels > 30 * 96 * 96 * 0.15


def test_tiles_vary():
    size = 64
    layers = [synthetic.draw_layers(np.random.default_rng([0, i, size]), size) for i in range(60)]
    fractions = np.array([x.mask.mean() for x in layers])
    assert (fractions == 0).sum() >= 3  # tiles without water
    assert ((fractions > 0.02) & (fractions < 0.2)).sum() >= 5  # rivers, small lakes
    assert (fractions > 0.4).sum() >= 5  # big lakes, coasts
    assert sum(x.cloud.max() > 0.5 for x in layers) >= 3  # some thick clouds
    means = np.array([x.water_colour[x.water].mean(0) for x in layers if x.water.any()])
    assert np.ptp(means, axis=0).max() > 0.15  # several water colours


def test_parallel_generation_equals_serial(tmp_path):
    serial = synthetic.generate(tmp_path / "serial", num_images=9, size=32, seed=2, workers=1)
    parallel = synthetic.generate(tmp_path / "parallel", num_images=9, size=32, seed=2, workers=2)
    assert serial == parallel
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")
    assert synthetic.read_manifest(tmp_path / "serial") == {"num_images": 9, "size": 32, "seed": 2}


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    render = synthetic.render_tile

    def failing(seed, index, size, *classes):
        if index == 4:
            raise KeyboardInterrupt  # Ctrl-C halfway
        return render(seed, index, size, *classes)

    monkeypatch.setattr(synthetic, "render_tile", failing)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / "tiles", num_images=8, size=32, workers=1)
    assert list(tmp_path.iterdir()) == []  # no half-written set, no temporary folder


def test_regeneration_replaces_own_set_but_never_a_foreign_folder(tmp_path):
    synthetic.generate(tmp_path / "tiles", num_images=5, size=32)
    synthetic.generate(tmp_path / "tiles", num_images=3, size=32)
    assert len(list((tmp_path / "tiles" / "images").iterdir())) == 3
    foreign = tmp_path / "mine"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="was not written by this generator"):
        synthetic.generate(foreign, num_images=3, size=32)
    assert (foreign / "images" / "keep.jpg").read_bytes() == b"x"


def test_synthetic_cli(tmp_path, capsys):
    synthetic_cli.main(["--out", str(tmp_path), "--num", "3", "--size", "32", "--seed", "5"])
    assert "wrote 3 tiles" in capsys.readouterr().out
    assert len(list((tmp_path / "images").iterdir())) == 3
    assert len(list((tmp_path / "masks").iterdir())) == 3


def test_building_class_tiles():
    """With 'building' the water is the same tile's water; about half the tiles get a district,
    never under water; the ids are 0/1/2; the manifest tells the two sets apart."""
    with_buildings = 0
    for index in range(40):
        _, water = synthetic.render_tile(3, index, 64)
        _, ids = synthetic.render_tile(3, index, 64, ("water", "building"))
        assert ids.dtype == np.uint8 and set(np.unique(ids)) <= {0, 1, 2}
        np.testing.assert_array_equal(ids == 1, water)
        with_buildings += bool((ids == 2).any())
    assert 10 <= with_buildings <= 30
    assert synthetic.manifest(5, 64, 0) != synthetic.manifest(5, 64, 0, ("water", "building"))
    with pytest.raises(ValueError, match="synthetic classes"):
        synthetic.render_tile(0, 0, 32, ("road",))
