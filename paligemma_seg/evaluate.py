"""`python -m paligemma_seg.evaluate [--config CFG] --workdir DIR [--checkpoint P] [--split test]`.

Scores a split with `infer.evaluation.run_evaluation` (eval.json, eval_examples.jsonl, the contact
sheet in the workdir) and prints the headline numbers as one JSON line (mIoU, mIoU over non-empty
ground truths, cIoU, mask AP, box AP@0.5, valid rate, ceiling, image count). Weights: --checkpoint,
else WORKDIR/checkpoints (newest), else WORKDIR/params.npz, else the config's `init`; --checkpoint
may be a workdir too. Without --config, WORKDIR/config.json (written by training). The weights
file used is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import jax

from paligemma_seg import cli
from paligemma_seg.infer import evaluation, segmenter


def _run_config(path: str | None) -> Any:
    """Without --config: the config.json training wrote beside --checkpoint, else in --workdir."""
    from paligemma_seg.infer import pretrained, sources

    if not path:
        raise ValueError("pass --config CFG, or --workdir of a training run (its config.json).")
    return pretrained.run_config(sources.resolve(path), None)


def main(argv: Sequence[str]) -> int:
    """The CLI; returns the exit status (1: bad arguments or missing files)."""
    cli.start_up()
    try:
        values, positional = cli.parse_flags(
            argv,
            [
                ("workdir", "Where eval.json etc. go and weights are looked for."),
                ("split", "Split to score (default: the config's eval.split)."),
            ],
            config_required=False,
        )
        if positional:
            raise ValueError(f"unexpected arguments {positional}")
        cfg = values.config or _run_config(values.checkpoint or values.workdir)
        workdir = values.workdir or cfg.workdir
        if not workdir:
            raise ValueError("no workdir: pass --workdir DIR or set the config's `workdir`.")
        model, params, mesh = segmenter.load_model(cfg, values.checkpoint, workdir)
        with jax.set_mesh(mesh):
            result = evaluation.run_evaluation(
                cfg, model, params, workdir, values.split or cfg.eval.split
            )
    except ValueError as error:
        logging.error("%s", error)
        return 1
    if jax.process_index() == 0:
        keys = ("miou", "miou_nonempty", "ciou", "mask_ap", "box_ap50", "valid_rate")
        keys += ("ceiling_miou", "num_images")
        print(json.dumps({key: result[key] for key in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
