"""What training asks of each JSONL line: prompts per class or all classes at once, detection from
segmentation answers, weighted mixtures of files, and the check of other tools' lines.

PaliGemma's conventions: `segment a ; b` answers `<loc>x4 <seg>x16 a ; <loc>x4 <seg>x16 b ...`,
`detect a ; b` answers `<loc>x4 a ; <loc>x4 b ...`. Lines of one class (the water data) are kept
as they are in every mode. For lines of several classes (`classes` in the line, or the labels of
a `segment a ; b` prompt):
  joint      the line as it is: every class in the prompt, every object in the answer;
  per_class  one example per class present (`segment a` -> its objects), plus, for each absent
             class, with probability `negative_rate`, `segment c` -> the empty answer.
Detection (`tasks` holding 'detect') adds, for each segmentation example, the same question as
`detect ...` answered with its boxes and labels only. Lines whose prompt is neither (captions, VQA)
pass through unchanged. All choices are seeded: the same seed gives the same examples.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from paligemma_seg.segtokens import codec as codec_lib
from paligemma_seg.segtokens.layout import LOCS_PER_BOX, NUM_CODES, NUM_LOC_BINS

PROMPT_MODES = ("joint", "per_class")
TASKS = ("segment", "detect")
_ANY_TOKEN = re.compile(r"<(loc|seg)(\d+)>")
_LOC = re.compile(r"<loc(\d{4})>")


def prompt_task(prefix: str) -> tuple[str | None, list[str]]:
    """('segment' | 'detect' | None, labels) of a prompt: `segment water ; building`."""
    words = prefix.strip().split(maxsplit=1)
    if not words or words[0].lower() not in TASKS:
        return None, []
    labels = [label.strip() for label in (words[1] if len(words) > 1 else "").split(";")]
    return words[0].lower(), [label for label in labels if label]


def _detection_problem(suffix: str) -> str | None:
    for chunk in codec_lib.split_objects(suffix):
        tokens = list(_ANY_TOKEN.finditer(chunk))
        kinds = [t.group(1) for t in tokens]
        if kinds != ["loc"] * LOCS_PER_BOX or tokens[0].start() != 0:
            return f"object {chunk[:60]!r}: expected 4 <loc> tokens then a label"
        values = [int(m.group(1)) for m in _LOC.finditer(chunk)]
        if len(values) != LOCS_PER_BOX or max(values) >= NUM_LOC_BINS:
            return f"object {chunk[:60]!r}: a <loc> needs 4 digits, 0000..{NUM_LOC_BINS - 1}"
        if values[2] <= values[0] or values[3] <= values[1]:
            return f"object {chunk[:60]!r}: inverted or empty box"
    return None


def line_problem(prefix: str, suffix: str) -> str | None:
    """Why a JSONL line's answer is not valid for its prompt (None: valid).

    `segment` answers must parse as objects of 4 <loc> + 16 <seg> + label; `detect` answers as
    4 <loc> + label; any other answer's <loc>/<seg> tokens must be well-formed (4 digits below
    1024, 3 digits below 128)."""
    task, _ = prompt_task(prefix)
    if task == "segment":
        for obj in codec_lib.parse_suffix(suffix):
            if obj.problem:
                return f"segment answer, object {obj.text[:60]!r}: {obj.problem}"
        return None
    if task == "detect":
        return _detection_problem(suffix)
    for match in _ANY_TOKEN.finditer(suffix):
        kind, digits = match.group(1), match.group(2)
        width, limit = (4, NUM_LOC_BINS) if kind == "loc" else (3, NUM_CODES)
        if len(digits) != width or int(digits) >= limit:
            return f"malformed token {match.group(0)} (<loc> needs 4 digits < 1024, <seg> 3 < 128)"
    return None


def detection_suffix(segmentation_suffix: str) -> str:
    """A segmentation answer with its <seg> tokens removed: boxes and labels only."""
    objects = []
    for obj in codec_lib.parse_suffix(segmentation_suffix):
        locs = "".join(f"<loc{v:04d}>" for v in obj.locs)
        objects.append(f"{locs} {obj.label}" if obj.label else locs)
    return codec_lib.join_objects(objects)


@dataclasses.dataclass(frozen=True)
class Question:
    """A prompt/answer pair made from a line (same image)."""

    prefix: str
    suffix: str


def questions(
    prefix: str,
    suffix: str,
    classes: Sequence[str] | None,
    *,
    prompts: str,
    negative_rate: float,
    tasks: Sequence[str],
    rng: np.random.Generator,
) -> list[Question]:
    """The examples training makes of one line (see the module docstring)."""
    if prompts not in PROMPT_MODES:
        raise ValueError(f"data.prompts must be one of {PROMPT_MODES}, got {prompts!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"data.tasks must name some of {TASKS} (comma-separated), got {tasks}")
    task, prompt_labels = prompt_task(prefix)
    if task != "segment":
        return [Question(prefix, suffix)]  # detection, captions, VQA: as given
    labels = list(classes) if classes else prompt_labels
    made = []
    if prompts == "joint" or len(labels) <= 1:
        made.append(Question(prefix, suffix))
    else:
        objects = codec_lib.parse_suffix(suffix)
        for label in labels:
            own = [o.text for o in objects if o.label == label]
            if own or rng.random() < negative_rate:
                made.append(Question(f"segment {label}", codec_lib.join_objects(own)))
    if "detect" in tasks:
        made += [
            Question("detect" + q.prefix[len("segment") :], detection_suffix(q.suffix))
            for q in list(made)
        ]
    if "segment" not in tasks:
        made = [q for q in made if q.prefix.startswith("detect")]
    return made


def mixture_indices(sizes: Sequence[int], weights: Sequence[float], seed: int) -> list[np.ndarray]:
    """Per source, the example indices of one mixed epoch: source i gets round(N * w_i / sum(w))
    slots (N = all examples), filled by cycling a seeded permutation of its examples."""
    if len(sizes) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights {list(weights)} must be >= 0, one per file, not all 0")
    total, weight_sum = sum(sizes), float(sum(weights))
    out = []
    for source, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        slots = int(round(total * weight / weight_sum))
        if slots and not size:
            raise ValueError(f"mixture source {source} has weight {weight} but no examples")
        order = np.random.default_rng([seed, source]).permutation(size) if size else np.zeros(0)
        out.append(np.resize(order, slots).astype(np.int64) if slots else np.zeros(0, np.int64))
    return out
