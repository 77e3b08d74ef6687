"""Tokenizer: loc/seg ids, PaliGemma's text layout, object-wise shortening, parity with transformers."""

import importlib.util
import pathlib
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from paligemma_seg.tokenizer import Tokenizer, tokenize_batch, tokenize_example

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_MODEL = REPO_ROOT / "checkpoints" / "tokenizer_small.model"
SUFFIX = (
    "<loc0010><loc0020><loc0500><loc0600>"
    + "".join(f"<seg{i:03d}>" for i in range(16))
    + " water ; <loc0000><loc0001><loc1022><loc1023>"
    + "".join(f"<seg{127 - i:03d}>" for i in range(16))
    + " water"
)
TEXTS = [
    "segment water",
    "detect lake ; river",
    SUFFIX,
    "Hello,  world 12345!\n",
    " leading and trailing space ",
    "tab\tand\n\nnewlines",
    "unicode café ü 水",
    "",
]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_small_tokenizer", REPO_ROOT / "scripts" / "make_small_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(SMALL_MODEL)


def test_small_tokenizer_script_reproduces_shipped_model():
    assert _load_script().make_small_tokenizer() == SMALL_MODEL.read_bytes()


def test_tokenizer_small_ids_and_pieces(tok):
    assert 1500 <= tok.vocab_size <= 2300
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.decode([tok.newline_id]) == "\n"
    # Appended at the end of the vocabulary, like big_vision's extension of Gemma's.
    np.testing.assert_array_equal(tok.loc_ids, tok.vocab_size - 1152 + np.arange(1024))
    np.testing.assert_array_equal(tok.seg_ids, tok.vocab_size - 128 + np.arange(128))
    assert tok.encode("<loc0005><seg127>") == [tok.loc_id(5), tok.seg_id(127)]
    assert (
        tok.decode([tok.bos_id, tok.loc_id(1023), tok.seg_id(7), tok.eos_id]) == "<loc1023><seg007>"
    )
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="loc index 1024"):
        tok.loc_id(1024)


def test_tokenizer_rejects_model_without_loc_tokens(tmp_path):
    script = _load_script()
    base = script.train_base_model(script.build_corpus(), 1024)
    path = tmp_path / "base.model"
    path.write_bytes(base)
    with pytest.raises(ValueError, match=r"1024 of 1024 <loc\.\.\.> tokens are missing.*<loc0000>"):
        Tokenizer.load(path)
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_tokenizer_real_vocabulary_layout(tmp_path):
    """A Gemma-sized stand-in (256,000 base ids + loc + seg) gives PaliGemma's real ids."""
    script = _load_script()
    proto = sentencepiece_model_pb2.ModelProto.FromString(
        script.train_base_model(script.build_corpus(), 1024)
    )
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for i in range(256_000 - len(proto.pieces)):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=unused)
    model = script.append_user_pieces(
        proto.SerializeToString(), script.LOC_PIECES + script.SEG_PIECES
    )
    tok = Tokenizer(spm.SentencePieceProcessor(model_proto=model))
    assert tok.vocab_size == 257_152
    assert (tok.loc_id(0), tok.loc_id(1023), tok.seg_id(0), tok.seg_id(127)) == (
        256_000,
        257_023,
        257_024,
        257_151,
    )
    assert tok.encode("<seg000> water") == [257_024] + tok.encode(" water")


def test_tokenize_example_layout(tok):
    example = tokenize_example(tok, "segment water", "<loc0001> water", seq_len=12)
    prefix, suffix = tok.encode("segment water"), tok.encode("<loc0001> water")
    real = 1 + len(prefix) + 1 + len(suffix) + 1
    expected_text = [2, *prefix, tok.newline_id, *suffix, 1] + [0] * (12 - real)
    np.testing.assert_array_equal(example.text, expected_text)
    head = 2 + len(prefix)
    np.testing.assert_array_equal(example.mask_ar, [0] * head + [1] * (12 - head))
    np.testing.assert_array_equal(
        example.mask_loss, [0] * head + [1] * (real - head) + [0] * (12 - real)
    )
    np.testing.assert_array_equal(example.mask_input, [1] * real + [0] * (12 - real))
    assert example.dropped_objects == 0
    assert all(a.dtype == np.int32 and a.shape == (12,) for a in (example.text, example.mask_ar))


def test_tokenize_example_prompt_and_empty_suffix(tok):
    prompt = tokenize_example(tok, "segment water", None, seq_len=8)
    head = 2 + len(tok.encode("segment water"))
    np.testing.assert_array_equal(
        prompt.text[:head], [2, *tok.encode("segment water"), tok.newline_id]
    )
    assert prompt.text[head:].tolist() == [0] * (8 - head)
    assert prompt.mask_loss.sum() == 0 and prompt.mask_input.sum() == head
    np.testing.assert_array_equal(prompt.mask_ar, [0] * head + [1] * (8 - head))
    empty = tokenize_example(tok, "segment water", "", seq_len=8)  # no water: learn to stop at once
    assert empty.text[head] == tok.eos_id and empty.mask_loss.tolist() == [0] * head + [1] + [0] * (
        7 - head
    )


def test_tokenize_example_drops_whole_objects(tok):
    objects = SUFFIX.split(" ; ")
    one = len(tok.encode(objects[0])) + 1
    head = 2 + len(tok.encode("segment water"))
    example = tokenize_example(tok, "segment water", SUFFIX, seq_len=head + one + 3)
    assert example.dropped_objects == 1
    real = example.text[example.mask_input == 1]
    assert real[-1] == tok.eos_id
    assert tok.decode(real[head:]) == objects[0]
    full = tokenize_example(tok, "segment water", SUFFIX, seq_len=64)
    assert full.dropped_objects == 0 and tok.decode(full.text) == "segment water\n" + SUFFIX
    with pytest.raises(ValueError, match="first object alone needs"):
        tokenize_example(tok, "segment water", SUFFIX, seq_len=head + one - 1)


def test_tokenize_example_rejects_long_prefix(tok):
    with pytest.raises(ValueError, match="raise seq_len or shorten"):
        tokenize_example(tok, "segment water " * 10, None, seq_len=8)
    with pytest.raises(ValueError, match="needs at least EOS"):
        tokenize_example(tok, "segment", "water", seq_len=3)


def test_tokenize_batch_stacks_examples(tok):
    batch = tokenize_batch(tok, ["segment water", "detect water"], [SUFFIX, ""], seq_len=30)
    assert batch["text"].shape == (2, 30) and batch["text"].dtype == np.int32
    assert batch["dropped_objects"].tolist() == [1, 0]
    single = tokenize_example(tok, "detect water", "", 30)
    np.testing.assert_array_equal(batch["mask_loss"][1], single.mask_loss)
    prompts = tokenize_batch(tok, ["a", "b"], None, seq_len=6)
    assert prompts["mask_loss"].sum() == 0
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        tokenize_batch(tok, ["a", "b"], ["x"], seq_len=6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(SMALL_MODEL, directory / "tokenizer.model")
    return directory


def test_transformers_gemma_tokenizer_matches_sentencepiece(tok, hf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GemmaTokenizerFast.from_pretrained(hf_dir)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_tokenize_example_matches_paligemma_processor(tok, hf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GemmaTokenizerFast.from_pretrained(hf_dir)
    image_processor = transformers.SiglipImageProcessor(size={"height": 16, "width": 16})
    image_processor.image_seq_length = num_image = 4
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf)
    image = np.zeros((16, 16, 3), np.uint8)
    prefixes = ["segment water", "detect water ; lake", "segment water"]
    suffixes = [SUFFIX, "", "<loc0001><loc0002><loc0003><loc0004> water"]
    for prefix, suffix in zip(prefixes, suffixes, strict=True):
        out = processor(
            images=[image], text=["<image>" + prefix], suffix=[suffix], return_tensors="np"
        )
        ours = tokenize_example(tok, prefix, suffix, seq_len=80)
        real = ours.mask_input == 1
        assert (out["input_ids"][0, :num_image] == processor.image_token_id).all()
        np.testing.assert_array_equal(out["input_ids"][0, num_image:], ours.text[real])
        np.testing.assert_array_equal(out["token_type_ids"][0, num_image:], ours.mask_ar[real])
        expected_labels = np.where(ours.mask_loss == 1, ours.text, -100)[real]
        np.testing.assert_array_equal(out["labels"][0, num_image:], expected_labels)
    # Prompt form: the processor without a suffix gives [image] BOS prefix "\n".
    out = processor(images=[image], text=["<image>segment water"], return_tensors="np")
    prompt = tokenize_example(tok, "segment water", None, seq_len=20)
    np.testing.assert_array_equal(
        out["input_ids"][0, num_image:], prompt.text[prompt.mask_input == 1]
    )
    # Padding: transformers pads Gemma on the left unless told otherwise; on the right it agrees with
    # mask_input, while its token_type_ids are 0 on padding where big_vision's mask_ar is 1.
    hf.padding_side = "right"
    out = processor(
        images=[image, image],
        text=["<image>" + p for p in prefixes[:2]],
        suffix=suffixes[:2],
        padding="max_length",
        max_length=num_image + 80,
        return_tensors="np",
    )
    batch = tokenize_batch(tok, prefixes[:2], suffixes[:2], seq_len=80)
    np.testing.assert_array_equal(out["input_ids"][:, num_image:], batch["text"])
    np.testing.assert_array_equal(out["attention_mask"][:, num_image:], batch["mask_input"])
    np.testing.assert_array_equal(out["labels"][:, num_image:] != -100, batch["mask_loss"] == 1)
    np.testing.assert_array_equal(
        out["token_type_ids"][:, num_image:], batch["mask_ar"] * batch["mask_input"]
    )
