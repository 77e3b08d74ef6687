"""Evaluation on a tiny setup: the CLI's files and fields, and the numbers on a perfect "model"."""

import json
import pathlib

import numpy as np
import pytest
import test_predict
import train_fixtures
from PIL import Image
from test_predict import bucket_files, tiny_model

from paligemma_seg import evaluate, experiment
from paligemma_seg.infer import evaluation
from paligemma_seg.infer import segmenter as segmenter_lib
from paligemma_seg.segtokens import codec as codec_lib

SHAPES = [(40, 50), (64, 64), (30, 90), (80, 45), (50, 50), (33, 77)]
gs_bucket = test_predict.gs_bucket  # the fixture: a gs:// folder kept in memory
FIELDS = (
    "miou", "ciou", "dice", "precision", "recall", "valid_rate", "object_count_mae",
    "ceiling_miou", "num_images", "step", "split", "invalid_objects", "contact_sheet",
)  # fmt: skip


def write_eval_split(root: pathlib.Path, codec) -> list[dict]:
    """Random images with 0-2 rectangles of water, masks as grey PNGs, test.jsonl with suffixes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rows = []
    for i, (height, width) in enumerate(SHAPES):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        mask = np.zeros((height, width), np.uint8)
        for k in range(i % 3):  # 0, 1 or 2 objects
            mask[k * height // 2 : k * height // 2 + height // 3, width // 5 : width // 2] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        suffix = codec.encode(mask).suffix
        rows.append(
            {
                "image": f"images/{i}.png",
                "prefix": "segment water",
                "suffix": suffix,
                "mask": f"masks/{i}.png",
            }  # fmt: skip
        )
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "inference"
    cfg, model, params, npz = tiny_model(root)
    rows = write_eval_split(root, experiment.load_codec(cfg))
    return cfg, model, params, npz, rows


def test_evaluate_cli_writes_eval_json_with_all_fields(setup, tmp_path):
    cfg, _, _, npz, rows = setup
    flags = [f"--config.{k}={v}" for k, v in train_fixtures.overrides(cfg.data.jsonl_dir).items()]
    flags += [
        f"--config.codec.vqvae={cfg.codec.vqvae}",
        f"--config.seq_len={cfg.seq_len}",
        f"--config.eval.batch_size={cfg.eval.batch_size}",
        "--config.eval.contact_sheet_rows=3",
    ]
    config = str(train_fixtures.TINY_CONFIG)
    argv = ["evaluate", "--config", config, *flags, f"--workdir={tmp_path}", f"--checkpoint={npz}"]
    assert evaluate.main([*argv, "--split=test"]) == 0

    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(FIELDS) <= set(result)
    assert result["num_images"] == len(rows) and result["split"] == "test"
    assert result["valid_rate"] == 1.0  # constrained decoding on by default
    examples = [
        json.loads(line) for line in (tmp_path / "eval_examples.jsonl").read_text().splitlines()
    ]
    assert len(examples) == len(rows)
    assert {"image", "text", "iou", "valid"} <= set(examples[0])
    assert result["miou"] == pytest.approx(np.mean([e["iou"] for e in examples]))
    assert result["ceiling_miou"] == pytest.approx(np.mean([e["ceiling_iou"] for e in examples]))
    assert [e["gt_objects"] for e in examples] == [i % 3 for i in range(len(rows))]
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.mode == "RGB" and sheet.height > 3 * 150
    assert not list(tmp_path.glob("contact_sheet_step*.png"))  # no step given


class _PerfectSegmenter(segmenter_lib.Segmenter):
    """Answers each image with its ground-truth suffix, in file order."""

    answers: list[str] = []

    def predict_inputs(self, inputs, sizes, prompt):
        texts = [self.answers.pop(0) for _ in sizes]
        return [
            self._to_prediction(self.tokenizer.encode(text), True, h, w)
            for text, (h, w) in zip(texts, sizes, strict=True)
        ]


def test_run_evaluation_scores_perfect_answers_at_the_codec_ceiling(setup, tmp_path, monkeypatch):
    cfg, model, params, _, rows = setup
    _PerfectSegmenter.answers = [row["suffix"] for row in rows]
    monkeypatch.setattr(segmenter_lib, "Segmenter", _PerfectSegmenter)
    result = evaluation.run_evaluation(cfg, model, params, str(tmp_path), "test", step=7)
    assert result["miou"] == pytest.approx(result["ceiling_miou"])
    assert result["valid_rate"] == 1.0 and result["object_count_mae"] == 0.0
    assert result["step"] == 7
    # Empty ground truth answered with the empty suffix scores 1 (rows 0 and 3 have no water).
    examples = [
        json.loads(line) for line in (tmp_path / "eval_examples.jsonl").read_text().splitlines()
    ]
    assert examples[0]["iou"] == examples[3]["iou"] == 1.0 and examples[0]["text"] == ""
    assert (tmp_path / "contact_sheet_step000007.png").is_file()
    curve = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert curve["step"] == 7 and curve["eval_miou"] == pytest.approx(result["miou"])


def test_run_evaluation_needs_mask_paths(setup, tmp_path):
    cfg, model, params, _, rows = setup
    jsonl = pathlib.Path(cfg.data.jsonl_dir) / "nomask.jsonl"
    jsonl.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "mask"}) + "\n")
    with pytest.raises(ValueError, match="no 'mask'"):
        evaluation.run_evaluation(cfg, model, params, str(tmp_path), "nomask")


def test_run_evaluation_writes_into_a_bucket(setup, gs_bucket, tmp_path, monkeypatch):
    """A gs:// workdir (non-local, see test_predict.gs_bucket) gets the same files as a local one;
    eval.json is replaced (no temporary left) and metrics.jsonl appended to on a second call."""
    cfg, model, params, _, rows = setup
    monkeypatch.setattr(segmenter_lib, "Segmenter", _PerfectSegmenter)
    for workdir in (str(tmp_path), f"{gs_bucket}/run"):
        for step in (3, 4):
            _PerfectSegmenter.answers = [row["suffix"] for row in rows]
            result = evaluation.run_evaluation(cfg, model, params, workdir, "test", step=step)
        assert result["contact_sheet"] == f"{workdir}/contact_sheet.png"
    local, remote = bucket_files(tmp_path), bucket_files(f"{gs_bucket}/run")
    assert set(remote) == {
        "eval.json", "eval_examples.jsonl", "metrics.jsonl", "contact_sheet.png",
        "contact_sheet_step000003.png", "contact_sheet_step000004.png",
    }  # fmt: skip
    for name in ("eval_examples.jsonl", "metrics.jsonl", "contact_sheet.png"):
        assert remote[name] == local[name], name
    steps = [json.loads(line)["step"] for line in remote["metrics.jsonl"].decode().splitlines()]
    assert steps == [3, 4]
    written = json.loads(remote["eval.json"])
    assert written["step"] == 4 and written["miou"] == pytest.approx(result["miou"])


def test_ceilings_come_from_report_json_when_it_vouches_for_them(setup, tmp_path, monkeypatch):
    """Converted data: report.json's per-image ceilings equal the codec's own recomputation, and
    are used only for the same codec settings and VQ-VAE file content (else recomputed)."""
    import dataclasses

    from paligemma_seg.data import convert as convert_lib
    from paligemma_seg.data import pipeline

    cfg, model, params, _, _ = setup
    root = pathlib.Path(cfg.data.jsonl_dir)
    codec = experiment.load_codec(cfg)
    out = tmp_path / "converted"
    convert_lib.convert(
        root / "images", root / "masks", out, codec=codec, vqvae_path=cfg.codec.vqvae,
        workers=1, progress=False,
    )  # fmt: skip
    examples = pipeline.read_jsonl(out / "all.jsonl")
    stored = evaluation.stored_ceilings(str(out / "all.jsonl"), "all", examples, codec,
                                        cfg.codec.vqvae)  # fmt: skip
    truths = [evaluation._truth(e) for e in examples]
    assert stored == pytest.approx([codec.ceiling_iou(t) for t in truths], abs=1e-6)
    assert len(stored) == len(SHAPES) and min(stored) < 1.0  # not a trivial all-ones list
    other_settings = codec_lib.MaskCodec(
        codec.vqvae, dataclasses.replace(codec.config, max_objects=1)
    )
    assert evaluation.stored_ceilings(
        str(out / "all.jsonl"), "all", examples, other_settings, cfg.codec.vqvae
    ) is None  # fmt: skip
    other_file = tmp_path / "other.npz"
    other_file.write_bytes(pathlib.Path(cfg.codec.vqvae).read_bytes() + b"\0")
    assert evaluation.stored_ceilings(
        str(out / "all.jsonl"), "all", examples, codec, str(other_file)
    ) is None  # fmt: skip
    (out / "report.json").unlink()
    assert evaluation.stored_ceilings(
        str(out / "all.jsonl"), "all", examples, codec, cfg.codec.vqvae
    ) is None  # fmt: skip
