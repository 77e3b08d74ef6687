"""Fetch real PaliGemma weights, the PaliGemma tokenizer and vae-oid.npz into checkpoints/.

Needs the internet and, for the model weights, a licence accepted on Kaggle or Hugging Face:
  pip install -e ".[download]"
  python scripts/download_weights.py --model pg1-3b-224             # Kaggle, big_vision .npz
  python scripts/download_weights.py --model pg2-3b-224 --source hf # Hugging Face directory
  python scripts/download_weights.py --only tokenizer vae           # no licence needed

Kaggle needs ~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY; Hugging Face needs
`huggingface-cli login` (or HF_TOKEN). Files are written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import urllib.error
import urllib.request

PUBLIC_FILES = {
    # Public Google Cloud Storage objects of big_vision (no licence click needed).
    "tokenizer": (
        "https://storage.googleapis.com/big_vision/paligemma_tokenizer.model",
        "paligemma_tokenizer.model",
    ),
    "vae": ("https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz", "vae-oid.npz"),
}


def kaggle_handle(model: str) -> tuple[str, str, str]:
    """Return (Kaggle handle, file inside it, name under checkpoints/) for e.g. 'pg2-3b-224'."""
    family, size, res = model.split("-")
    if family == "pg1":
        name = f"paligemma-{size}-pt-{res}"
        return f"google/paligemma/jax/{name}", f"{name}.f16.npz", f"{name}.npz"
    name = f"paligemma2-{size}-pt-{res}"
    return f"google/paligemma-2/jax/{name}", f"{name}.b16.npz", f"{name}.npz"


def hf_repo(model: str) -> tuple[str, str]:
    """Return (Hugging Face repo id, directory name under checkpoints/)."""
    family, size, res = model.split("-")
    name = f"paligemma-{size}-pt-{res}" if family == "pg1" else f"paligemma2-{size}-pt-{res}"
    return f"google/{name}", f"{name}-hf"


def download_url(url: str, dest: pathlib.Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 22):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\r  {done / 2**20:8.1f} / {total / 2**20:.1f} MiB", end="", flush=True)
        print()
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise SystemExit(
            f"error: could not download {url}: {err}.\n"
            f"No internet here? Copy the file by hand to {dest} from a machine that has it."
        ) from err
    tmp.replace(dest)


def download_kaggle(model: str, out_dir: pathlib.Path) -> None:
    try:
        import kagglehub
    except ImportError as err:
        raise SystemExit('error: kagglehub is missing: pip install -e ".[download]"') from err
    handle, filename, target = kaggle_handle(model)
    print(
        f"kagglehub: {handle} / {filename} (accept the licence at kaggle.com/models/google first)"
    )
    try:
        path = kagglehub.model_download(handle, filename)
    except Exception as err:  # kagglehub raises many types; all mean the same to the user
        raise SystemExit(
            f"error: Kaggle download of {handle}/{filename} failed: {err}.\n"
            "Check the internet, KAGGLE_USERNAME/KAGGLE_KEY and that the licence is accepted."
        ) from err
    dest = out_dir / target
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(path, tmp)
    tmp.replace(dest)
    print(f"wrote {dest}")


def download_hf(model: str, out_dir: pathlib.Path) -> None:
    try:
        import huggingface_hub
    except ImportError as err:
        raise SystemExit('error: huggingface_hub is missing: pip install -e ".[download]"') from err
    repo, dirname = hf_repo(model)
    dest = out_dir / dirname
    tmp = out_dir / (dirname + ".partial")
    print(f"huggingface_hub: {repo} (accept the licence on its model page first)")
    try:
        huggingface_hub.snapshot_download(
            repo, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]
        )
    except Exception as err:
        raise SystemExit(
            f"error: Hugging Face download of {repo} failed: {err}.\n"
            "Check the internet, `huggingface-cli login` and that the licence is accepted."
        ) from err
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"wrote {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model", default="pg1-3b-224", help="pg1-3b-{224,448,896}, pg2-{3b,10b,28b}-..."
    )
    parser.add_argument("--source", choices=["kaggle", "hf"], default="kaggle")
    parser.add_argument("--out", default="checkpoints", type=pathlib.Path)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["model", "tokenizer", "vae"],
        default=["model", "tokenizer", "vae"],
    )
    args = parser.parse_args(argv)
    if args.model.count("-") != 2 or not args.model.startswith(("pg1-", "pg2-")):
        parser.error(f"--model {args.model!r}: expected e.g. pg1-3b-224 or pg2-10b-448")
    args.out.mkdir(parents=True, exist_ok=True)
    for key in ("tokenizer", "vae"):
        if key in args.only:
            url, name = PUBLIC_FILES[key]
            dest = args.out / name
            if dest.exists():
                print(f"{dest} exists; skipping")
            else:
                download_url(url, dest)
    if "model" in args.only:
        (download_kaggle if args.source == "kaggle" else download_hf)(args.model, args.out)


if __name__ == "__main__":
    sys.exit(main())
