r"""Two classes offline: water and built-up districts, the tiny model trained on generated tiles.

Like configs/water_tiny.py (no downloads, no GPU), but the tiles hold water and, in half of them, a
built-up district (`data.synthetic.classes`), and the masks are class ids converted with
`data.classes = '1=water,2=building'`. Each class is one object (`codec.whole_mask` per class), so
a joint answer is at most two objects:

    python -m paligemma_seg.train --config configs/landcover_tiny.py   # -> runs/landcover_tiny/

eval.json then holds per-class IoU (`per_class_iou`), mIoU over classes (`miou_classes`) and
today's per-image numbers. The measurement behind `data.prompts` is in the README ("Your own
data") and in the module docstring of paligemma_seg/data/tasks.py.
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """water_tiny's model and recipe on two-class tiles; see the module docstring."""
    c = config_files.load(pathlib.Path(__file__).with_name("water_tiny.py"))
    c.workdir = "runs/landcover_tiny"
    c.total_steps = 1200
    c.seq_len = 56  # BOS + "segment water ; building" + "\n" (6) + two objects (43) + EOS.
    c.val_steps = 400
    c.ckpt_steps = 600

    c.data.images = "data/synthetic_landcover/images"
    c.data.masks = "data/synthetic_landcover/masks"
    c.data.splits.train = "data/synthetic_landcover/train_images.txt"
    c.data.splits.test = "data/synthetic_landcover/test_images.txt"
    c.data.jsonl_dir = "data/synthetic_landcover_jsonl"
    c.data.synthetic.num_images = 6_000  # 5,400 train / 600 test tiles.
    c.data.synthetic.classes = "water,building"
    c.data.classes = "1=water,2=building"
    c.data.prompts = "joint"  # Measured against 'per_class': README, "Your own data".
    c.data.negative_rate = 0.5

    c.codec.whole_mask = True  # One box per class.
    c.codec.max_objects = 1  # Per class.
    c.decode.max_objects = 2  # One per class of a joint prompt.
    c.eval.max_examples = 0
    return c
