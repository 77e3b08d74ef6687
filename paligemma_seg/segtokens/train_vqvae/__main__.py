"""`python -m paligemma_seg.segtokens.train_vqvae --masks DIR [--masks DIR ...] --out FILE.npz`."""

from __future__ import annotations

import argparse
import json

from paligemma_seg.segtokens import train_vqvae
from paligemma_seg.segtokens.train_vqvae import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=train_vqvae.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--masks", action="append", default=[], help="folder of mask files (repeatable)"
    )
    parser.add_argument(
        "--list", default=None, help="only masks whose file name is listed (one per line)"
    )
    parser.add_argument(
        "--out", required=True, help="output .npz (vae-oid format); .json report beside it"
    )
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument(
        "--generated", type=int, default=TrainConfig.generated, help="generated training crops"
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--iou-weight", type=float, default=TrainConfig.iou_weight,
        help="weight of the soft-IoU loss beside the pixel cross-entropy",
    )  # fmt: skip
    parser.add_argument(
        "--shape-mix", choices=sorted(train_vqvae.SHAPE_MIXES), default=TrainConfig.shape_mix,
        help="generated kinds: plain, or thin_water (river networks, reservoirs, coasts, specks)",
    )  # fmt: skip
    parser.add_argument(
        "--init", default=TrainConfig.init,
        help="start from this vae-oid-format .npz (fine-tune; fresh optimizer), not random",
    )  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument(
        "--max-minutes", type=float, default=0, help="stop (and save) after this long; 0 = off"
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        generated=args.generated,
        seed=args.seed,
        iou_weight=args.iou_weight,
        shape_mix=args.shape_mix,
        init=args.init,
    )
    result = train(args, cfg)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k not in ("history", "holdout_real_masks")},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
