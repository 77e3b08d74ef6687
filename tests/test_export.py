"""An export that serves: `weights convert params.npz OUT --tokenizer ...` -> transformers' processor
and model give the tokens our `Segmenter` gives.

Token equality: HF `generate` gets our preprocessed pixels (`data.preprocess`, tf.image.resize
bilinear without antialiasing) and the processor's input_ids; greedy, no grammar on either side
(`decode.constrained=False`). Pixels: the processor's own pixel_values (PIL bilinear on uint8) are
checked separately against ours. For an image smaller than the model's side (66x81 -> 112 px,
upsampling) they agree within one uint8 level (PIL's float bilinear equals TF's exactly; its uint8
path rounds), and greedy tokens from them came out equal too (printed, not asserted). For a larger
image PIL averages over the area (antialiasing) and TF does not, so they differ more (printed);
an image already resized by our preprocessing to the model's side passes through unchanged.
"""

import pathlib
import shutil

import numpy as np
import pytest
import test_predict
import torch
import transformers
from PIL import Image

from paligemma_seg import experiment, weights
from paligemma_seg import tokenizer as tokenizer_lib
from paligemma_seg.data import images as images_lib
from paligemma_seg.data import preprocess
from paligemma_seg.infer import decode
from paligemma_seg.infer import segmenter as segmenter_lib
from paligemma_seg.weights import WeightsError, hf_processor
from paligemma_seg.weights import __main__ as weights_cli

PROMPT = "segment water"
SMALL_IMAGE = "water_body_8897.jpg"  # 66 x 81 px: upsampled to the model's 112 px
LARGE_IMAGE = "water_body_2366.jpg"  # 1654 x 2159 px: downsampled
IMAGE_SIZE = 112  # 8 x 8 = 64 image tokens


class RecordingSegmenter(segmenter_lib.Segmenter):
    """A Segmenter that also keeps the generated ids (before EOS) and whether EOS came."""

    def _to_prediction(self, ids, finished, height, width, detect=False):
        self.outputs = [*getattr(self, "outputs", []), (list(ids), finished)]
        return super()._to_prediction(ids, finished, height, width, detect)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, model, params, HF directory) of a random tiny model exported with the CLI."""
    root = tmp_path_factory.mktemp("export")
    overrides = {"model.overrides.vision.image_size": IMAGE_SIZE, "decode.constrained": False}
    cfg = test_predict.inference_config(root, **overrides)
    npz = test_predict.write_random_weights(experiment.model_config(cfg), root / "params.npz")
    out = root / "hf"
    assert weights_cli.main(["convert", str(npz), str(out), "--tokenizer", cfg.tokenizer]) == 0
    model, params, _ = segmenter_lib.load_model(cfg, str(npz))
    return cfg, model, params, out


def test_export_writes_tokenizer_and_preprocessor(exported):
    cfg, _, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    } <= names
    assert (out / "tokenizer.model").read_bytes() == pathlib.Path(cfg.tokenizer).read_bytes()


def test_hf_generate_gives_our_tokens(exported, water_dir, capsys):
    cfg, model, params, out = exported
    pixels = images_lib.read_image(water_dir / "images" / SMALL_IMAGE).pixels
    segmenter = RecordingSegmenter(cfg, model, params)
    [prediction] = segmenter.predict_images([pixels], PROMPT)
    [(our_ids, our_finished)] = segmenter.outputs

    processor = transformers.PaliGemmaProcessor.from_pretrained(out)
    pre = processor.image_processor
    assert pre.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert pre.image_seq_length == model.config.vision.num_patches == 64
    assert int(pre.resample) == int(Image.Resampling.BILINEAR)
    hf_model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    image_token = hf_model.config.image_token_index
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token == 2176
    inputs = processor(images=pixels, text="<image>" + PROMPT, return_tensors="pt")
    ours = preprocess.from_pixels(pixels, IMAGE_SIZE)
    ours_chw = torch.from_numpy(ours.transpose(2, 0, 1)[None].copy())

    # input_ids: image tokens, then our prompt layout ([BOS] prefix "\n", parts tokenized apart).
    prompt_len = decode.prompt_length(segmenter.tokenizer, [PROMPT])
    layout = tokenizer_lib.tokenize_example(segmenter.tokenizer, PROMPT, None, prompt_len).text
    image_ids = [image_token] * model.config.vision.num_patches
    assert inputs["input_ids"][0].tolist() == image_ids + layout.tolist()
    assert inputs["token_type_ids"].sum() == 0  # the whole prompt attends fully, as ours

    max_new = decode.resolve_max_new_tokens(cfg.decode, cfg.seq_len, prompt_len)

    def generate(pixel_values):
        with torch.no_grad():
            tokens = hf_model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                token_type_ids=inputs["token_type_ids"],
                pixel_values=pixel_values,
                do_sample=False,
                max_new_tokens=max_new,
            )
        new = tokens[0, inputs["input_ids"].shape[1] :].tolist()
        eos = segmenter.tokenizer.eos_id
        return (new[: new.index(eos)], True) if eos in new else (new, False)

    assert len(our_ids) > 10  # a random model: many tokens to agree on
    assert generate(ours_chw) == (our_ids, our_finished)
    # The text a client hands to our codec (segtokens.codec), as transformers decodes it.
    assert processor.decode(our_ids, skip_special_tokens=True) == prediction.text

    small_diff = float(np.abs(inputs["pixel_values"][0].numpy() - ours.transpose(2, 0, 1)).max())
    large = images_lib.read_image(water_dir / "images" / LARGE_IMAGE).pixels
    large_hf = processor.image_processor(large, return_tensors="np")["pixel_values"][0]
    large_diff = np.abs(large_hf - preprocess.from_pixels(large, IMAGE_SIZE).transpose(2, 0, 1))
    same_with_hf_pixels = generate(inputs["pixel_values"]) == (our_ids, our_finished)
    with capsys.disabled():
        print(
            f"\nprocessor pixel_values vs ours: {SMALL_IMAGE} {pixels.shape[:2]} -> {IMAGE_SIZE}: "
            f"max |diff| {small_diff:.5f} (tokens equal with HF's pixels: {same_with_hf_pixels}); "
            f"{LARGE_IMAGE} {large.shape[:2]}: max {large_diff.max():.3f}, "
            f"mean {large_diff.mean():.4f}"
        )
    assert small_diff < 1 / 127.5  # within one uint8 level

    # Resized by us to the model's side first (uint8), the processor only rescales and normalizes.
    resized = np.round((preprocess.from_pixels(large, IMAGE_SIZE) + 1) * 127.5).astype(np.uint8)
    passed = processor.image_processor(resized, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(passed, resized.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_tokenizer_model_alone_loads_the_same(exported, tmp_path):
    """Without tokenizer.json (an export made without transformers installed) transformers
    converts tokenizer.model itself, with the same ids."""
    *_, out = exported
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "tokenizer.json").unlink()
    text = "<image><image><bos>segment water\n<loc0003><seg127> water ; <loc1023>"
    ids = [
        transformers.AutoTokenizer.from_pretrained(d).encode(text, add_special_tokens=False)
        for d in (out, bare)
    ]
    assert ids[0] == ids[1] and ids[0][:3] == [2176, 2176, 2]


def test_export_errors(exported, tmp_path):
    cfg, model, _, out = exported
    with pytest.raises(WeightsError, match="image_token_index is 5"):
        hf_processor.processor_files(cfg.tokenizer, model.config, image_token_index=5)
    small = model.config.replace(llm={"vocab_size": 1000})
    with pytest.raises(WeightsError, match="only 1000"):
        hf_processor.processor_files(cfg.tokenizer, small, image_token_index=2176)
    with pytest.raises(WeightsError, match="not found"):
        weights.convert(tmp_path / "p.npz", tmp_path / "x", tokenizer=tmp_path / "missing.model")
    with pytest.raises(WeightsError, match="only into an HF directory"):
        weights.convert(out, tmp_path / "back.npz", tokenizer=cfg.tokenizer)
