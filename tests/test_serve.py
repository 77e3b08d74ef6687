"""The web page (`python -m paligemma_seg.serve`) in a real headless browser: Debian's chromium
driven by playwright uploads a shared water image, waits for the overlay, downloads the mask PNG
and compares it with `Segmenter.predict`'s mask; a screenshot goes to docs/images/serve_page.png.
Also the request handler's limits, without a browser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from train_fixtures import REPO, reference_run, subprocess_env

from paligemma_seg import Segmenter, serve

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO / "docs" / "images" / "serve_page.png"
WATER = "water_body_2375.jpg"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, child: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"serve exited with {child.returncode}:\n{child.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_page_in_a_browser_returns_the_api_mask(run_dir, water_dir, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium (bash .ci/run does it)")
    from playwright.sync_api import sync_playwright

    image_path = water_dir / "images" / WATER
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    args = [sys.executable, "-m", "paligemma_seg.serve", "--checkpoint", str(run_dir)]
    child = subprocess.Popen(
        [*args, "--port", str(port)], env=subprocess_env(), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        expected = Segmenter.from_pretrained(run_dir).predict(image_path)
        _wait_until_up(url, child)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(image_path))
            page.locator("#prompt textarea").fill("segment water")
            page.locator("#segment").click()
            page.locator("#overlay img").wait_for(state="visible", timeout=120_000)
            link = page.locator("#mask_png a").first
            link.wait_for(timeout=60_000)
            response = page.request.get(link.get_attribute("href"))
            assert response.ok
            (tmp_path / "mask.png").write_bytes(response.body())
            link = page.locator("#mask_geojson a").first
            link.wait_for(timeout=60_000)
            response = page.request.get(link.get_attribute("href"))
            assert response.ok
            (tmp_path / "mask.geojson").write_bytes(response.body())
            text = page.locator("#text textarea").input_value()
            summary = page.locator("#summary").inner_text()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            staged = SCREENSHOT.with_name(SCREENSHOT.name + ".tmp.png")
            page.screenshot(path=str(staged), full_page=True)
            os.replace(staged, SCREENSHOT)
            browser.close()
    finally:
        child.terminate()
        log = child.communicate(timeout=30)[0]
    with Image.open(tmp_path / "mask.png") as mask_png:
        got = np.asarray(mask_png) > 0
    np.testing.assert_array_equal(got, expected.mask)
    polygons = json.loads((tmp_path / "mask.geojson").read_text())
    assert _rasterised(polygons, got.shape).sum() == pytest.approx(got.sum(), rel=0.02, abs=5)
    assert text == expected.text
    assert "predicted in" in summary and f"{expected.objects} object(s)" in summary
    assert "127.0.0.1" in log and "Weights: " in log
    for line in ("oneDNN custom operations", "absl::InitializeLog()"):
        assert line not in log


def _rasterised(polygons: dict, shape: tuple[int, int]) -> np.ndarray:
    from rasterio import features

    shapes = [(f["geometry"], 1) for f in polygons["features"]]
    return features.rasterize(shapes, out_shape=shape) == 1 if shapes else np.zeros(shape, bool)


def test_mask_geojson_rasterises_back_to_a_real_water_mask(water_dir):
    from paligemma_seg.infer import scene_outputs

    with Image.open(water_dir / "masks" / WATER) as png:
        mask = np.asarray(png.convert("L")) > 127
    exact = json.loads(scene_outputs.mask_geojson(mask, tolerance=0.0))
    np.testing.assert_array_equal(_rasterised(exact, mask.shape), mask)  # pixel outlines
    polygons = json.loads(scene_outputs.mask_geojson(mask))  # simplified at 1 px
    assert "crs" not in polygons and len(polygons["features"]) >= 1
    back = _rasterised(polygons, mask.shape)
    assert (back & mask).sum() / (back | mask).sum() >= 0.98  # JPEG-ragged edges: 0.9885
    assert sum(f["properties"]["area_px"] for f in polygons["features"]) == pytest.approx(
        mask.sum(), rel=0.02
    )


class _Echo:
    """Stands in for a Segmenter: the top half of every image is water."""

    def predict(self, pixels, prompt=None):
        from paligemma_seg.infer.segmenter import Prediction

        mask = np.zeros(pixels.shape[:2], bool)
        mask[: pixels.shape[0] // 2] = True
        box = (0, 0, pixels.shape[0] // 2, pixels.shape[1])
        return Prediction(f"{prompt}", mask, [box], 1, 0, True, ["water"], [mask])


def test_answer_writes_the_mask_and_enforces_the_pixel_limit(tmp_path):
    masks = serve.MaskFolder()
    pixels = np.full((20, 30, 3), 7, np.uint8)
    result = serve.answer(_Echo(), masks, pixels, " segment water ", max_pixels=600)
    assert result.text == "segment water" and "1 object(s) (water)" in result.summary
    assert os.path.dirname(os.path.dirname(result.mask_png)) == masks.root
    with Image.open(result.mask_png) as png:
        np.testing.assert_array_equal(np.asarray(png)[:, 0], [255] * 10 + [0] * 10)
    assert result.overlay.size == (30, 20)
    assert os.path.dirname(result.geojson) == os.path.dirname(result.mask_png)
    with open(result.geojson) as f:
        np.testing.assert_array_equal(
            _rasterised(json.load(f), (20, 30))[:, 0], [1] * 10 + [0] * 10
        )
    with pytest.raises(ValueError, match=r"at most 0\.0 \(--max-megapixels\)"):
        serve.answer(_Echo(), masks, pixels, "segment water", max_pixels=599)
    with pytest.raises(ValueError, match="upload an image first"):
        serve.answer(_Echo(), masks, None, "segment water", max_pixels=600)
