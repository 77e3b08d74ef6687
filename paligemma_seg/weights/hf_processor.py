"""The files that make an exported HF directory serve: the tokenizer and the image preprocessor.

`processor_files` turns a SentencePiece `.model` and the model config into the files that
`transformers.PaliGemmaProcessor.from_pretrained` reads next to config.json:

- `tokenizer.model` (the SentencePiece file, unchanged), `tokenizer_config.json` and
  `special_tokens_map.json`: Gemma's special tokens, every control and user-defined piece as an
  added token (as transformers' own conversion makes them), plus `<image>` as an added special
  token at exactly config.json's `image_token_index`, so the processor's input_ids line up with
  the model;
- `tokenizer.json` when transformers is installed to build it (else transformers converts
  `tokenizer.model` when it loads the directory), checked against our tokenizer on probe texts;
- `preprocessor_config.json`: the model's image size, bilinear resize, x / 255 then (x - 0.5) /
  0.5 (= x / 127.5 - 1, `data.preprocess`), `image_seq_length` = the number of image tokens.

transformers' processor builds the prompt `<image> * image_seq_length + <bos> + prefix + "\\n"`,
which is our layout (`tokenizer.tokenize_example`: image tokens, then `[BOS] prefix "\\n"`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from paligemma_seg.model.config import PaliGemmaConfig
from paligemma_seg.tokenizer import Tokenizer
from paligemma_seg.weights.spec import WeightsError

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_JSON = "tokenizer.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_TOKEN = "<image>"
PROCESSOR_CLASS = "PaliGemmaProcessor"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as preprocessor_config.json stores `resample`
# SentencePiece piece types (sentencepiece_model.proto): which pieces become added tokens.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# Texts whose ids transformers' tokenizer must give exactly as ours does (prompts and answers).
_PROBES = (
    "segment water\n",
    "<loc0000><loc0512><loc1023><loc0007><seg000><seg064><seg127> water ; <loc0001>",
    "caption en\n",
    "detect lake ; river\n",
)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Our tokenizer at `path` (a SentencePiece .model with loc/seg pieces), or a WeightsError."""
    try:
        return Tokenizer.load(path)
    except ValueError as error:
        raise WeightsError(str(error)) from None


def preprocessor_config(config: PaliGemmaConfig) -> dict[str, Any]:
    """`preprocessor_config.json`: SigLIP's image processor set to our preprocessing."""
    size = config.vision.image_size
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": PROCESSOR_CLASS,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": PIL_BILINEAR,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": config.vision.num_patches,
    }


def _added_token(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _tokenizer_configs(
    proto: sentencepiece_model_pb2.ModelProto, tokenizer: Tokenizer, image_token_index: int
) -> dict[str, bytes]:
    """`tokenizer_config.json` and `special_tokens_map.json` for the pieces of `proto`."""
    pieces = [piece.piece for piece in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    names = {
        "bos_token": pieces[tokenizer.bos_id],
        "eos_token": pieces[tokenizer.eos_id],
        "pad_token": pieces[tokenizer.pad_id],
        **({"unk_token": pieces[unk_id]} if 0 <= unk_id < len(pieces) else {}),
    }
    added = {
        str(i): _added_token(piece.piece, special=piece.type != _USER_DEFINED)
        for i, piece in enumerate(proto.pieces)
        if piece.type in (_UNKNOWN, _CONTROL, _USER_DEFINED)
    }
    added[str(image_token_index)] = _added_token(IMAGE_TOKEN, special=True)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "processor_class": PROCESSOR_CLASS,
        **names,
        "additional_special_tokens": [IMAGE_TOKEN],
        "add_bos_token": True,  # the processor turns it off and writes <bos> into the prompt
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    special_map = {key: _added_token(value, True) for key, value in names.items()}
    special_map["additional_special_tokens"] = [_added_token(IMAGE_TOKEN, True)]
    # As bytes, so the added tokens stay in id order (write_directory sorts the keys of JSON).
    as_bytes = lambda content: (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode()
    return {TOKENIZER_CONFIG: as_bytes(config), SPECIAL_TOKENS_MAP: as_bytes(special_map)}


def _image_token_check(pieces: list[str], image_token_index: int, vocab_size: int) -> None:
    """`<image>` must land at `image_token_index`: its piece, or the first id after the pieces."""
    if len(pieces) > vocab_size:
        raise WeightsError(
            f"the tokenizer has {len(pieces)} ids but the model's vocabulary only {vocab_size}; "
            "pass the tokenizer that belongs to the weights"
        )
    if IMAGE_TOKEN in pieces:
        where = pieces.index(IMAGE_TOKEN)
        if where != image_token_index:
            raise WeightsError(
                f"the tokenizer's {IMAGE_TOKEN} piece has id {where} but config.json's "
                f"image_token_index is {image_token_index}; they must be equal"
            )
    elif image_token_index != len(pieces):
        raise WeightsError(
            f"config.json's image_token_index is {image_token_index} but the tokenizer has "
            f"{len(pieces)} ids, so an added {IMAGE_TOKEN} token gets id {len(pieces)}; pass "
            f"image_token_index={len(pieces)} (the model's vocabulary has {vocab_size} rows)"
        )


@contextlib.contextmanager
def _written(files: dict[str, bytes]) -> Iterator[pathlib.Path]:
    """A temporary directory holding `files`."""
    with tempfile.TemporaryDirectory(prefix="paligemma_tokenizer.") as tmp:
        directory = pathlib.Path(tmp)
        for name, content in files.items():
            (directory / name).write_bytes(content)
        yield directory


def _check_hf_tokenizer(
    hf_tokenizer: Any, ours: Tokenizer, image_token_index: int, what: str
) -> None:
    """`<image>` at `image_token_index` and the probe texts encoded as ours encodes them."""
    image_id = hf_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != image_token_index:
        raise WeightsError(
            f"transformers' tokenizer ({what}) gives {IMAGE_TOKEN} id {image_id}, not "
            f"image_token_index {image_token_index}"
        )
    for text in _PROBES:
        theirs, mine = hf_tokenizer.encode(text, add_special_tokens=False), ours.encode(text)
        if theirs != mine:
            raise WeightsError(
                f"transformers' tokenizer ({what}) encodes {text!r} as {theirs}, ours as {mine}; "
                "the exported tokenizer would not match the model's training"
            )


def _tokenizer_json(
    files: dict[str, bytes], ours: Tokenizer, image_token_index: int
) -> bytes | None:
    """transformers' `tokenizer.json` for these files, checked; None without transformers."""
    try:
        import transformers
    except ImportError:  # transformers converts tokenizer.model itself when it loads the directory
        return None

    def load(directory: pathlib.Path, what: str) -> Any:
        try:
            hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        except Exception as error:  # transformers raises many kinds
            message = f"transformers cannot load the tokenizer ({what}): {error}"
            raise WeightsError(message) from None
        _check_hf_tokenizer(hf_tokenizer, ours, image_token_index, what)
        return hf_tokenizer

    with _written(files) as directory:
        built = load(directory, f"built from {TOKENIZER_MODEL}")
        data = built.backend_tokenizer.to_str(pretty=True).encode()
        (directory / TOKENIZER_JSON).write_bytes(data)
        load(directory, f"read from {TOKENIZER_JSON}")
    return data


def processor_files(
    tokenizer_path: str | os.PathLike, config: PaliGemmaConfig, image_token_index: int
) -> dict[str, Any]:
    """name -> content (bytes, or a dict written as JSON) of the tokenizer and preprocessor files.

    The tokenizer must hold no more ids than the model's vocabulary, and `<image>` must get
    `image_token_index` (the first id after the pieces, or an `<image>` piece of that id).
    """
    ours = load_tokenizer(tokenizer_path)
    data = pathlib.Path(tokenizer_path).read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    _image_token_check([p.piece for p in proto.pieces], image_token_index, config.llm.vocab_size)
    files: dict[str, bytes] = {
        TOKENIZER_MODEL: data,
        **_tokenizer_configs(proto, ours, image_token_index),
    }
    built = _tokenizer_json(files, ours, image_token_index)
    return {
        **files,
        **({TOKENIZER_JSON: built} if built is not None else {}),
        PREPROCESSOR_CONFIG: preprocessor_config(config),
    }
