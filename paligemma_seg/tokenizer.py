"""SentencePiece tokenizer with PaliGemma's `<locNNNN>`/`<segNNN>` pieces; (prefix, suffix) -> text.

Owns token ids and the prefix-LM text layout; it knows nothing about masks beyond the " ; " that
separates objects in a suffix (so a long suffix is shortened by whole objects). Works with the real
`paligemma_tokenizer.model` (257,152 ids) and the small `checkpoints/tokenizer_small.model`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from paligemma_seg.segtokens.layout import (
    NUM_CODES,
    NUM_LOC_BINS,
    OBJECT_SEPARATOR,
    loc_token,
    seg_token,
)

PREFIX_SEPARATOR = "\n"


class Tokenizer:
    """A SentencePiece model that must hold all 1024 loc and 128 seg pieces as single tokens."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        self._sp = processor
        self.source = source
        self.vocab_size = int(processor.get_piece_size())
        self.pad_id, self.eos_id, self.bos_id = (
            int(processor.pad_id()),
            int(processor.eos_id()),
            int(processor.bos_id()),
        )
        specials = {"pad": self.pad_id, "eos": self.eos_id, "bos": self.bos_id}
        missing_special = [name for name, i in specials.items() if i < 0]
        if missing_special:
            raise ValueError(
                f"{source}: the SentencePiece model defines no {'/'.join(missing_special)} id; "
                "PaliGemma needs pad, eos and bos (Gemma: 0, 1, 2). Use "
                "paligemma_tokenizer.model or checkpoints/tokenizer_small.model."
            )
        self.loc_ids = self._single_piece_ids([loc_token(i) for i in range(NUM_LOC_BINS)], "loc")
        self.seg_ids = self._single_piece_ids([seg_token(i) for i in range(NUM_CODES)], "seg")
        newline = self.encode(PREFIX_SEPARATOR)
        if len(newline) != 1:
            raise ValueError(f"{source}: '\\n' must be one token (Gemma: 108), got {newline}.")
        self.newline_id = newline[0]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a `.model` file; a missing file or missing loc/seg pieces raise a ValueError."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(
                f"tokenizer file {path} not found; use checkpoints/tokenizer_small.model (made by "
                "`python scripts/make_small_tokenizer.py`) or download paligemma_tokenizer.model."
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a SentencePiece model: {error}") from error
        return cls(processor, source=path)

    def _single_piece_ids(self, pieces: list[str], name: str) -> np.ndarray:
        """Ids of `pieces`; each must exist and encode to exactly itself."""
        ids = [int(self._sp.piece_to_id(piece)) for piece in pieces]
        missing = [
            piece
            for piece, i in zip(pieces, ids, strict=True)
            if self._sp.id_to_piece(i) != piece or self._sp.encode(piece) != [i]
        ]
        if missing:
            raise ValueError(
                f"{self.source}: {len(missing)} of {len(pieces)} <{name}...> tokens are missing or "
                f"not single pieces (first: {missing[0]}). PaliGemma needs <loc0000>..<loc1023> "
                "and <seg000>..<seg127>: use paligemma_tokenizer.model or "
                "checkpoints/tokenizer_small.model."
            )
        return np.asarray(ids, dtype=np.int32)

    def loc_id(self, i: int) -> int:
        """Id of `<loc{i:04d}>`, i in [0, 1024)."""
        if not 0 <= i < NUM_LOC_BINS:
            raise ValueError(f"loc index {i} outside [0, {NUM_LOC_BINS})")
        return int(self.loc_ids[i])

    def seg_id(self, i: int) -> int:
        """Id of `<seg{i:03d}>`, i in [0, 128)."""
        if not 0 <= i < NUM_CODES:
            raise ValueError(f"seg index {i} outside [0, {NUM_CODES})")
        return int(self.seg_ids[i])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad/bos/eos vanish, loc/seg come back as `<locNNNN>`/`<segNNN>`."""
        return self._sp.decode([int(i) for i in ids])


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One sequence of length T; see `tokenize_example` for the layout."""

    text: np.ndarray  # int32[T] token ids, padded with pad_id
    mask_ar: np.ndarray  # int32[T] 0 = full attention (BOS, prefix, "\n"), 1 = causal (the rest)
    mask_loss: np.ndarray  # int32[T] 1 on suffix + EOS
    mask_input: np.ndarray  # int32[T] 1 = real token, 0 = padding
    dropped_objects: int  # whole objects removed from the end of the suffix to fit


def _fit_suffix(tokenizer: Tokenizer, suffix: str, budget: int) -> tuple[list[int], int]:
    """Suffix ids + EOS in `budget` tokens, dropping whole trailing objects -> (ids, dropped)."""
    ids = tokenizer.encode(suffix) + [tokenizer.eos_id]
    if len(ids) <= budget:
        return ids, 0
    objects = suffix.split(OBJECT_SEPARATOR)
    for keep in range(len(objects) - 1, 0, -1):
        ids = tokenizer.encode(OBJECT_SEPARATOR.join(objects[:keep])) + [tokenizer.eos_id]
        if len(ids) <= budget:
            return ids, len(objects) - keep
    first = len(tokenizer.encode(objects[0])) + 1
    raise ValueError(
        f"seq_len leaves {budget} tokens for the suffix but its first object alone needs {first} "
        f"(with EOS): {objects[0][:80]!r}; raise seq_len by at least {first - budget}."
    )


def tokenize_example(
    tokenizer: Tokenizer, prefix: str, suffix: str | None, seq_len: int
) -> TokenizedExample:
    """PaliGemma's text layout, each part tokenized separately (as big_vision does):

        text      = [BOS] prefix "\\n" suffix [EOS] pad pad
        mask_ar   =   0     0     0     1      1    1   1
        mask_loss =   0     0     0     1      1    0   0
        mask_input=   1     1     1     1      1    0   0

    `suffix=None` is the prompt form used for decoding: `[BOS] prefix "\\n"` then padding. A suffix
    that does not fit loses whole trailing objects (" ; "-separated), counted in `dropped_objects`;
    a prefix that does not fit raises a ValueError. Training shifts targets itself: `text[1:]`
    weighted by `mask_loss[1:]`.
    """
    head = [tokenizer.bos_id] + tokenizer.encode(prefix) + [tokenizer.newline_id]
    budget = seq_len - len(head)
    if budget < (0 if suffix is None else 1):
        raise ValueError(
            f"prefix {prefix[:80]!r} takes {len(head)} tokens with BOS and '\\n' but "
            f"seq_len={seq_len}{'' if suffix is None else ' (and the suffix needs at least EOS)'}; "
            "raise seq_len or shorten the prefix."
        )
    tail, dropped = ([], 0) if suffix is None else _fit_suffix(tokenizer, suffix, budget)
    num_pad = budget - len(tail)
    text = head + tail + [tokenizer.pad_id] * num_pad
    mask_ar = [0] * len(head) + [1] * (len(tail) + num_pad)
    mask_loss = [0] * len(head) + [1] * len(tail) + [0] * num_pad
    mask_input = [1] * (len(head) + len(tail)) + [0] * num_pad
    as_array = lambda values: np.asarray(values, dtype=np.int32)
    return TokenizedExample(
        as_array(text), as_array(mask_ar), as_array(mask_loss), as_array(mask_input), dropped
    )


def tokenize_batch(
    tokenizer: Tokenizer,
    prefixes: Sequence[str],
    suffixes: Sequence[str | None] | None,
    seq_len: int,
) -> dict[str, np.ndarray]:
    """`tokenize_example` over a batch: `text`, `mask_ar`, `mask_loss`, `mask_input` int32[B, T] and
    `dropped_objects` int32[B]. `suffixes=None` gives the prompt form for every example."""
    if suffixes is None:
        suffixes = [None] * len(prefixes)
    if len(suffixes) != len(prefixes):
        raise ValueError(
            f"{len(prefixes)} prefixes but {len(suffixes)} suffixes; pass one suffix per prefix."
        )
    examples = [
        tokenize_example(tokenizer, prefix, suffix, seq_len)
        for prefix, suffix in zip(prefixes, suffixes, strict=True)
    ]
    shape = (len(examples), seq_len)
    batch = {
        key: np.asarray([getattr(e, key) for e in examples], np.int32).reshape(shape)
        for key in ("text", "mask_ar", "mask_loss", "mask_input")
    }
    batch["dropped_objects"] = np.asarray([e.dropped_objects for e in examples], dtype=np.int32)
    return batch
