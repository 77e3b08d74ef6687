"""Prediction on a tiny random model with the small tokenizer and a random VQ-VAE: the CLI's files,
and constrained decoding that always decodes to valid masks (vs. without the grammar).

`inference_config` and `write_random_vqvae` are shared with test_evaluate.py.
"""

import functools
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import train_fixtures
from PIL import Image

from paligemma_seg import experiment, predict, weights
from paligemma_seg.infer import segmenter as segmenter_lib
from paligemma_seg.model import param_shapes
from paligemma_seg.segtokens import vqvae

WATER_IMAGES = (
    "water_body_8897.jpg",
    "water_body_2375.jpg",
    "water_body_2366.jpg",
)  # 66 px .. 2 kpx


def write_random_vqvae(path: pathlib.Path) -> pathlib.Path:
    """A random VQ-VAE in vae-oid's format (tests must not depend on the shipped weights).

    Drawn with numpy: eager JAX initialisation takes many seconds on a busy CPU."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        arrays = {
            key: (rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)
            for key, shape in vqvae.expected_shapes().items()
        }
        np.savez(path, **arrays)
    return path


def write_random_weights(config, path: pathlib.Path) -> pathlib.Path:
    """Random parameters of `config` as a big_vision .npz, drawn with numpy (no init compile)."""
    rng = np.random.default_rng(0)

    def draw(key_path, leaf):
        name = jax.tree_util.keystr(key_path)
        if len(leaf.shape) >= 2:
            return rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[-2])
        base = 1.0 if "img" in name and "scale" in name else 0.0  # LayerNorm scales multiply
        return base + 0.1 * rng.normal(size=leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config))
    params = jax.tree_util.tree_map(lambda x: x.astype(np.float32), params)
    return weights.save_npz(params, path)


def inference_config(root: pathlib.Path, **extra):
    """train_fixtures' tiny model (28 px, 2-layer Gemma) + small tokenizer + a random VQ-VAE.

    seq_len 48 leaves room for 2 objects after the "segment water" prompt."""
    settings = {
        "codec.vqvae": str(write_random_vqvae(root / "vqvae_random.npz")),
        "seq_len": 48,
        "eval.batch_size": 4,
        **extra,
    }
    return train_fixtures.tiny_config(root, **settings)


@functools.cache
def tiny_model(root: pathlib.Path):
    """(cfg, model, params, weights .npz) with random weights, built once per session."""
    cfg = inference_config(root)
    npz = write_random_weights(experiment.model_config(cfg), root / "random_weights.npz")
    model, params, _ = segmenter_lib.load_model(cfg, str(npz))
    return cfg, model, params, npz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.getbasetemp() / "inference")


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Images of very different shapes, including sides so small that boxes need several bins."""
    rng = np.random.default_rng(seed)
    shapes = [(12, 300), (300, 9), (50, 50), (64, 128), (17, 23), (200, 150), (5, 5), (90, 31)]
    return [
        rng.integers(0, 255, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(count)
    ]


def test_predict_cli_writes_masks_at_image_size(tiny, water_dir, tmp_path):
    cfg, _, _, npz = tiny
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, ignored")
    Image.fromarray(np.full((37, 61), 90, np.uint8), "L").save(folder / "grey.png")
    Image.new("CMYK", (40, 20), (10, 20, 30, 0)).save(folder / "cmyk.jpg")
    images = [str(water_dir / "images" / name) for name in WATER_IMAGES]
    out = tmp_path / "out"
    flags = [f"--config.{k}={v}" for k, v in train_fixtures.overrides(tmp_path).items()]
    flags += [
        f"--config.codec.vqvae={cfg.codec.vqvae}",
        f"--config.seq_len={cfg.seq_len}",
        f"--config.eval.batch_size={cfg.eval.batch_size}",
        f"--checkpoint={npz}",
    ]
    argv = ["predict", "--config", str(train_fixtures.TINY_CONFIG), *flags]
    assert predict.main([*argv, *images, str(folder), "--out", str(out)]) == 0

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    errors = [r for r in records if "error" in r]
    assert [pathlib.Path(r["image"]).name for r in errors] == ["broken.jpg"]
    done = [r for r in records if "error" not in r]
    assert len(done) == len(WATER_IMAGES) + 2
    for record in done:
        with Image.open(record["image"]) as source:
            size = source.size
        with Image.open(out / record["mask"]) as mask:
            assert mask.mode == "L" and mask.size == size
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        with Image.open(out / record["overlay"]) as overlay:
            assert overlay.mode == "RGB" and overlay.size == size
        assert (out / f"{record['name']}.txt").read_text().strip() == record["text"].strip()
        assert (record["width"], record["height"]) == size
        assert record["valid"], record["text"]  # the grammar is on by default


def test_predict_cli_reports_bad_arguments(tmp_path):
    config = str(train_fixtures.REPO / "configs" / "water_tiny.py")
    assert predict.main(["predict", "--config", config, "--out", str(tmp_path)]) == 1
    assert predict.main(["predict", "--config", config, "--bogus=1", "x.jpg"]) == 1


def test_constrained_outputs_always_decode_valid_unlike_free_decoding(tiny, capsys):
    cfg, model, params, _ = tiny
    images = random_images(16)
    rates = {}
    for name, overrides in {
        "greedy, grammar": {},
        "sampled, grammar": {"decode.temperature": 1.0},
        "sampled, no grammar": {"decode.constrained": False, "decode.temperature": 1.0},
    }.items():
        variant = inference_config(pathlib.Path(cfg.data.jsonl_dir), **overrides)
        segmenter = segmenter_lib.Segmenter(variant, model, params)
        predictions = segmenter.predict_images(images, "segment water")
        rates[name] = 1 - np.mean([p.valid for p in predictions])
        if variant.decode.constrained:
            for image, p in zip(images, predictions, strict=True):
                assert p.valid and p.finished and p.invalid_objects == 0, p.text
                assert p.mask.shape == image.shape[:2]
                assert all(y2 > y1 and x2 > x1 for y1, x1, y2, x2 in p.boxes)
    with capsys.disabled():
        print(f"\ninvalid-output rate on a random tiny model: {rates}")
    assert rates["greedy, grammar"] == rates["sampled, grammar"] == 0.0
    assert rates["sampled, no grammar"] > 0.5  # free decoding of a random model rarely parses


def test_grammar_is_off_for_other_prompts(tiny):
    cfg, model, params, _ = tiny
    segmenter = segmenter_lib.Segmenter(cfg, model, params)
    assert segmenter._decoding("segment water")[1] is not None
    assert segmenter._decoding("caption en")[1] is None
    assert segmenter_lib.is_segmentation_prompt("  Segment the lake")


def test_params_source_order(tmp_path):
    cfg = inference_config(tmp_path)
    assert segmenter_lib.params_source(cfg, None, str(tmp_path)) == ""
    (tmp_path / "params.npz").write_bytes(b"")
    assert segmenter_lib.params_source(cfg, None, str(tmp_path)) == str(tmp_path / "params.npz")
    # a workdir given as --checkpoint: its params.npz
    assert segmenter_lib.params_source(cfg, str(tmp_path), None) == str(tmp_path / "params.npz")
    with pytest.raises(ValueError, match="not found"):
        segmenter_lib.params_source(cfg, str(tmp_path / "missing"), None)


SHARDED_SCRIPT = """
import json, pathlib, sys
sys.path.insert(0, "tests")
import jax, numpy as np
import test_predict as tp
from paligemma_seg.infer import segmenter as segmenter_lib

cfg, model, params, _ = tp.tiny_model(pathlib.Path(sys.argv[1]))
specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(params)}
images = tp.random_images(6)
with jax.set_mesh(segmenter_lib._mesh_of(params)):
    sharded = segmenter_lib.Segmenter(cfg, model, params).predict_images(images, "segment water")
local = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
single = segmenter_lib.Segmenter(cfg, model, local).predict_images(images, "segment water")
print(json.dumps({"devices": jax.device_count(), "fsdp": any("fsdp" in s for s in specs),
                  "sharded": [p.text for p in sharded], "single": [p.text for p in single]}))
"""


def test_segmenter_on_two_devices_fsdp_equals_one_device(tmp_path):
    """Parameters split over a 2-device fsdp mesh as training splits them, the batch over both."""
    env = train_fixtures.subprocess_env(devices=2)
    result = train_fixtures.run_cli([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)], env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["fsdp"]
    assert report["sharded"] == report["single"]


def test_overlay_blends_mask_and_outlines_boxes():
    from paligemma_seg import visualize

    image = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:15, 10:30] = True
    picture = np.asarray(visualize.overlay(image, mask, [(20, 30, 35, 55)], alpha=0.5))
    expected = np.round(0.5 * 100 + 0.5 * np.asarray(visualize.PRED_COLOR)).astype(np.uint8)
    np.testing.assert_array_equal(picture[10, 20], expected)  # inside the mask
    np.testing.assert_array_equal(picture[2, 2], [100, 100, 100])  # outside: unchanged
    np.testing.assert_array_equal(picture[20, 40], visualize.BOX_COLOR)  # the box's top edge
    np.testing.assert_array_equal(picture[27, 40], [100, 100, 100])  # inside the box, no mask
    with pytest.raises(ValueError, match="differs from image size"):
        visualize.overlay(image, mask[:, :10])
    row = visualize.SheetRow(image, mask, mask, caption="x")
    sheet = visualize.contact_sheet([row, row], cell=64)
    assert sheet.size[0] == 3 * 64 + 4 * 6 and sheet.size[1] > 2 * 64


class _GsInRam:
    """tf.io.gfile with every gs://... argument moved to TensorFlow's in-memory file system."""

    def __init__(self, gfile):
        self._gfile = gfile

    def __getattr__(self, name):
        function = getattr(self._gfile, name)

        def call(*args, **kwargs):
            args = [
                "ram://" + a[len("gs://") :] if isinstance(a, str) and a.startswith("gs://") else a
                for a in args
            ]
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if name == "GFile" and "w" in mode and self._gfile.exists(args[0]):
                self._gfile.remove(args[0])  # ram:// does not truncate on "w"; GCS and disks do
            return function(*args, **kwargs)

        return call


@pytest.fixture
def gs_bucket(monkeypatch, tmp_path):
    """A gs:// folder served by epath's own TensorFlow backend (what gs:// uses when TensorFlow is
    installed), kept in TensorFlow's in-memory file system: a non-local file system that plain
    `open`, `os.replace` or `PIL.Image.save(path)` cannot reach, and no network."""
    from etils.epath import backend, gpath

    class RamBackend(backend._TfBackend):
        @property
        def gfile(self):
            return _GsInRam(super().gfile)

    monkeypatch.setattr(backend, "tf_backend", RamBackend())
    # No cloud lookup (etils >= 1.15 asks whether a bucket is zonal).
    monkeypatch.setattr(gpath, "_is_zonal_gcs_bucket", lambda bucket: False, raising=False)
    root = f"gs://test-bucket/{tmp_path.name}"
    yield root
    assert not (pathlib.Path.cwd() / "gs:").exists()  # nothing went to a local "gs:" folder
    from etils import epath

    if epath.Path(root).exists():
        epath.Path(root).rmtree()


def bucket_files(root: str) -> dict[str, bytes]:
    """name -> bytes of the files directly in a gs:// (or local) folder, read through epath."""
    from etils import epath

    folder = epath.Path(root)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class _FixedSegmenter:
    """Answers every image with one box over its top-left quarter (no model)."""

    batch_size = 2
    image_size = 224  # the model's input side: these small images are predicted whole

    def predict_images(self, images, prompt):
        predictions = []
        for image in images:
            height, width = image.shape[:2]
            mask = np.zeros((height, width), bool)
            mask[: height // 2, : width // 2] = True
            box = (0, 0, height // 2, width // 2)
            predictions.append(segmenter_lib.Prediction(f"{prompt} {box}", mask, [box], 1, 0, True))
        return predictions


def test_run_prediction_writes_the_same_files_into_a_bucket(gs_bucket, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(random_images(3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    local = predict.run_prediction(_FixedSegmenter(), [str(folder)], tmp_path / "out", "seg")
    remote = predict.run_prediction(_FixedSegmenter(), [str(folder)], f"{gs_bucket}/out", "seg")
    assert local == remote == {"predicted": 3, "skipped": 1}
    expected = bucket_files(tmp_path / "out")
    assert set(expected) == {"predictions.jsonl"} | {
        f"{i}{kind}" for i in range(3) for kind in (".txt", "_mask.png", "_overlay.png")
    }
    assert bucket_files(f"{gs_bucket}/out") == expected
