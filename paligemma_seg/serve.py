"""A local web page to try a trained model (needs the `demo` extra: `pip install -e ".[demo]"`):

    python -m paligemma_seg.serve --checkpoint PATH [--config CFG] [--port 7860] [--host 127.0.0.1]

PATH: a training workdir, an orbax checkpoint, a .npz or an HF directory (as for
`Segmenter.from_pretrained`).
Upload an image, edit the prompt, press Segment: the page shows the overlay (mask + boxes), the
decoded text and the timing, and offers the mask PNG and its polygons (GeoJSON in pixel
coordinates, with the geo extra) for download. Bound to 127.0.0.1 unless --host says otherwise.
Uploads are capped (--max-upload-mb, --max-megapixels); the page sends pixels, never a path: the
only files written are the masks' PNG and GeoJSON, under a private temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from paligemma_seg import cli

DEMO_HINT = 'the web page needs the demo extra: pip install -e ".[demo]"'


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the page shows for one request."""

    overlay: Any  # PIL image: the mask blended in, boxes outlined
    mask_png: str  # path of the mask PNG offered for download
    geojson: str | None  # path of its polygons (pixel coordinates); None without the geo extra
    text: str  # the decoded text
    summary: str  # objects, validity, water fraction, timing


class MaskFolder:
    """Masks written atomically under one private temporary folder, a numbered folder each:
    mask.png and, when the geo extra is installed, mask.geojson (`scene_outputs.mask_geojson`)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="paligemma_seg_serve_")
        self._count = itertools.count(1)

    def write(self, mask: np.ndarray) -> tuple[str, str | None]:
        """(mask.png's path, mask.geojson's path or None without the geo extra)."""
        from paligemma_seg import visualize
        from paligemma_seg.data import geo
        from paligemma_seg.infer import scene_outputs

        folder = os.path.join(self.root, f"{next(self._count):06d}")
        os.mkdir(folder)
        path = os.path.join(folder, "mask.png")
        visualize.mask_image(mask).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
        try:
            text = scene_outputs.mask_geojson(mask)
        except geo.GeoDependencyError:
            return path, None
        polygons = os.path.join(folder, "mask.geojson")
        with open(polygons + ".tmp", "w") as f:
            f.write(text)
        os.replace(polygons + ".tmp", polygons)
        return path, polygons


def answer(segmenter: Any, masks: MaskFolder, image: Any, prompt: str, max_pixels: int) -> Answer:
    """One request: uint8 pixels + prompt -> overlay, mask PNG, text and timing."""
    from paligemma_seg import visualize
    from paligemma_seg.infer import pretrained

    if image is None:
        raise ValueError("upload an image first")
    pixels = pretrained.to_pixels(np.asarray(image))
    height, width = pixels.shape[:2]
    if height * width > max_pixels:
        raise ValueError(
            f"the image has {height * width / 1e6:.1f} megapixels; this page accepts at most "
            f"{max_pixels / 1e6:.1f} (--max-megapixels)"
        )
    started = time.perf_counter()
    prediction = segmenter.predict(pixels, prompt.strip() or None)
    seconds = time.perf_counter() - started
    summary = (
        f"{prediction.objects} object(s) ({', '.join(prediction.labels) or 'none'}), "
        f"{'valid' if prediction.valid else 'INVALID'} output, mask covers "
        f"{prediction.mask.mean():.1%} of {width}x{height} px; predicted in {seconds:.2f} s"
    )
    return Answer(
        visualize.overlay(pixels, prediction.mask, prediction.boxes),
        *masks.write(prediction.mask),
        prediction.text,
        summary,
    )


def build_page(segmenter: Any, default_prompt: str, max_pixels: int) -> Any:
    """The Gradio page (gr.Blocks) around `segmenter`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    masks = MaskFolder()

    def run(image: Any, prompt: str) -> tuple[Any, str, str | None, str, str]:
        try:
            result = answer(segmenter, masks, image, prompt, max_pixels)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return result.overlay, result.mask_png, result.geojson, result.text, result.summary

    with gr.Blocks(
        title="paligemma_seg", analytics_enabled=False, delete_cache=(600, 3600)
    ) as page:
        gr.Markdown("## paligemma_seg: segment an image")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="numpy", image_mode="RGB", sources=["upload"], label="Image",
                    elem_id="image",
                )  # fmt: skip
                prompt = gr.Textbox(value=default_prompt, label="Prompt", elem_id="prompt")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                overlay = gr.Image(
                    type="pil", format="png", label="Mask and boxes", interactive=False,
                    elem_id="overlay",
                )  # fmt: skip
                mask_file = gr.File(label="Mask PNG", interactive=False, elem_id="mask_png")
                polygons = gr.File(
                    label="Polygons (GeoJSON, pixel coordinates)", interactive=False,
                    elem_id="mask_geojson",
                )  # fmt: skip
                text = gr.Textbox(label="Decoded text", interactive=False, elem_id="text")
                summary = gr.Markdown(elem_id="summary")
        outputs = [overlay, mask_file, polygons, text, summary]
        button.click(run, [image, prompt], outputs, concurrency_limit=1)
    return page


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m paligemma_seg.serve", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="workdir, checkpoint, .npz or HF dir")
    parser.add_argument("--config", help="configs/NAME.py (default: the run's config.json)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="e.g. 0.0.0.0 to serve the network")
    parser.add_argument("--prompt", help="the page's first prompt (default: data.prefix)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    parser.add_argument("--max-megapixels", type=float, default=40.0)
    return parser.parse_args(list(argv)[1:])


def main(argv: Sequence[str]) -> int:
    """The CLI; returns the exit status (1: bad arguments, missing files or no demo extra)."""
    args = parse_args(argv)
    cli.start_up()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests, one per line
    try:
        import gradio  # noqa: F401
    except ImportError:
        logging.error("%s", DEMO_HINT)
        return 1
    from paligemma_seg.infer.segmenter import Segmenter

    try:
        segmenter = Segmenter.from_pretrained(args.checkpoint, args.config)
        started = time.perf_counter()
        segmenter.predict(np.zeros((32, 32, 3), np.uint8))  # compiles before the first visitor
    except ValueError as error:
        logging.error("%s", error)
        return 1
    logging.info("Model ready (compiled in %.1f s)", time.perf_counter() - started)
    page = build_page(
        segmenter, args.prompt or segmenter.cfg.data.prefix, int(args.max_megapixels * 1e6)
    )
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=int(args.max_upload_mb * 2**20),
        ssr_mode=False,
        show_error=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
