"""Training examples from JSONL lines: joint and per-class prompts, negatives, detection, mixtures,
and other tools' lines checked by file:line."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from paligemma_seg.data import pipeline, tasks
from paligemma_seg.segtokens import codec as codec_lib


def _object(label: str, y1: int = 1, codes: int = 0) -> str:
    return codec_lib.format_object([y1, 2, y1 + 300, 400], [codes] * 16, label)


WATER, ROAD, WATER2 = _object("water"), _object("road", 10, 5), _object("water", 500, 7)
JOINT = codec_lib.join_objects([WATER, WATER2, ROAD])


def _questions(prompts: str, rate: float = 0.0, task_names=("segment",), seed: int = 0, **kw):
    return tasks.questions(
        kw.get("prefix", "segment water ; road ; building"), kw.get("suffix", JOINT),
        kw.get("classes", ["water", "road", "building"]), prompts=prompts, negative_rate=rate,
        tasks=task_names, rng=np.random.default_rng(seed),
    )  # fmt: skip


def test_joint_keeps_the_line():
    assert _questions("joint") == [tasks.Question("segment water ; road ; building", JOINT)]


def test_per_class_splits_objects_and_samples_negatives():
    made = _questions("per_class", rate=0.0)
    assert made == [
        tasks.Question("segment water", codec_lib.join_objects([WATER, WATER2])),
        tasks.Question("segment road", ROAD),
    ]
    with_negative = _questions("per_class", rate=1.0)
    assert with_negative[-1] == tasks.Question("segment building", "")
    # The rate is a probability: over many lines about half of the absent classes are asked.
    rng = np.random.default_rng(0)
    asked = sum(
        len(tasks.questions("segment water ; road ; building", JOINT, None, prompts="per_class",
                            negative_rate=0.5, tasks=("segment",), rng=rng)) == 3
        for _ in range(2000)
    )  # fmt: skip
    assert 900 < asked < 1100


def test_one_class_lines_are_the_same_in_every_mode():
    line = dict(prefix="segment water", suffix=WATER, classes=None)
    assert _questions("per_class", rate=1.0, **line) == _questions("joint", **line)
    empty = dict(prefix="segment water", suffix="", classes=None)
    assert _questions("per_class", rate=0.0, **empty) == [tasks.Question("segment water", "")]


def test_detection_from_segmentation_answers():
    made = _questions("joint", task_names=("segment", "detect"))
    assert [q.prefix for q in made] == [
        "segment water ; road ; building", "detect water ; road ; building",
    ]  # fmt: skip
    boxes = codec_lib.parse_boxes(made[1].suffix)
    assert [o.label for o in boxes] == ["water", "water", "road"]
    assert [o.locs for o in boxes] == [o.locs for o in codec_lib.parse_suffix(JOINT)]
    assert "<seg" not in made[1].suffix
    only = _questions("per_class", task_names=("detect",))
    assert [q.prefix for q in only] == ["detect water", "detect road"]


def test_line_checks():
    assert tasks.line_problem("segment water", JOINT) is None
    assert tasks.line_problem("segment water", "") is None
    assert "16 seg" in tasks.line_problem("segment water", "<loc0001><loc0002><loc0300><loc0400> w")
    assert tasks.line_problem("detect a", "<loc0001><loc0002><loc0300><loc0400> a") is None
    assert "inverted" in tasks.line_problem("detect a", "<loc0300><loc0002><loc0001><loc0400> a")
    assert tasks.line_problem("caption en", "a lake next to a town") is None
    assert "malformed" in tasks.line_problem("answer en where?", "at <loc2000>")
    assert "malformed" in tasks.line_problem("answer en where?", "<seg12>")


def test_read_jsonl_reports_every_bad_line(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "prefix": "segment water", "suffix": WATER},
        {"image": "a.png", "prefix": "caption en", "suffix": "a lake"},
        {"image": "a.png", "prefix": "detect water", "suffix": WATER},  # <seg> in a box answer
        "not json",
        {"image": "missing.png", "prefix": "caption en", "suffix": "x"},
        {"image": "a.png", "prefix": "segment water"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(ValueError) as error:
        pipeline.read_jsonl(path)
    message = str(error.value)
    assert "4 bad line(s)" in message
    for number in (3, 4, 5, 6):
        assert f"mixed.jsonl:{number}:" in message
    assert "mixed.jsonl:1:" not in message and "mixed.jsonl:2:" not in message
    kept = pipeline.read_jsonl(path, skip_bad_lines=True)
    assert [e.prefix for e in kept] == ["segment water", "caption en"]


def test_mixture_weights():
    picks = tasks.mixture_indices([100, 10], [1.0, 1.0], seed=0)
    assert [len(p) for p in picks] == [55, 55]  # 110 slots, half each: the small one repeats
    assert sorted(set(picks[1].tolist())) == list(range(10))
    assert len(set(picks[0].tolist())) == 55  # subsampled without repeats
    again = tasks.mixture_indices([100, 10], [1.0, 1.0], seed=0)
    assert all((a == b).all() for a, b in zip(picks, again, strict=True))
    assert [len(p) for p in tasks.mixture_indices([30, 30], [3, 1], seed=1)] == [45, 15]
    with pytest.raises(ValueError, match="weights"):
        tasks.mixture_indices([5], [0.0], seed=0)


def test_split_examples_mixes_config_sources(tmp_path):
    """data.mixture through data.prepare.split_examples, as training reads it."""
    import ml_collections

    from paligemma_seg.data import prepare

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    seg = tmp_path / "seg.jsonl"
    seg.write_text(
        "".join(json.dumps({"image": "a.png", "prefix": "segment water ; road", "suffix": JOINT,
                            "classes": ["water", "road"]}) + "\n" for _ in range(20))
    )  # fmt: skip
    captions = tmp_path / "cap.jsonl"
    captions.write_text(
        json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "x"}) + "\n"
    )
    cfg = ml_collections.ConfigDict({
        "seed": 0,
        "data": {"prompts": "per_class", "negative_rate": 0.0, "tasks": "segment,detect",
                 "mixture": [{"jsonl": str(captions), "weight": 1.0}], "train_weight": 3.0,
                 "skip_bad_lines": False},
    })  # fmt: skip
    examples = prepare.split_examples(cfg, str(seg), train=True)
    prefixes = [e.prefix for e in examples]
    # 20 lines -> 80 questions (2 classes x segment/detect); with the caption file at weight 1
    # against 3: 81 examples in all, 61 from the segmentation file and 20 captions.
    assert len(examples) == 81
    assert prefixes.count("caption en") == 20
    assert {"segment water", "segment road", "detect water", "detect road"} <= set(prefixes)
    val = prepare.split_examples(cfg, str(seg), train=False)
    assert len(val) == 80 and "caption en" not in {e.prefix for e in val}
    assert pathlib.Path(val[0].image) == tmp_path / "a.png"
