"""`python -m paligemma_seg.data.synthetic --out DIR [--num N] [--size S] [--seed K]`."""

from __future__ import annotations

import argparse

from paligemma_seg.data.synthetic import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate satellite-like tiles with water masks.")
    parser.add_argument("--out", required=True, help="output directory (images/, masks/, lists)")
    parser.add_argument("--num", type=int, default=200, help="number of tiles")
    parser.add_argument("--size", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="worker processes (default: CPU cores)")
    parser.add_argument(
        "--classes", default="water", help="'water' or 'water,building' (class-id masks)"
    )
    args = parser.parse_args(argv)
    classes = tuple(c.strip() for c in args.classes.split(","))
    names = generate(args.out, args.num, args.size, args.seed, args.workers, classes)
    print(f"wrote {len(names)} tiles of {args.size}px to {args.out}")


if __name__ == "__main__":
    main()
