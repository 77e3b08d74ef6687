"""Train the project's small SentencePiece tokenizer (`checkpoints/tokenizer_small.model`).

A tiny stand-in for PaliGemma's 257,152-id tokenizer, for from-scratch models: a BPE model trained
with Gemma's settings on a generated corpus (prompts, common English words, digits, punctuation),
then the 1024 `<locNNNN>` and 128 `<segNNN>` pieces appended at the end as user-defined pieces, the
way big_vision extends the Gemma vocabulary. Same bytes on every run:

    python scripts/make_small_tokenizer.py --out checkpoints/tokenizer_small.model
"""

from __future__ import annotations

import argparse
import io
import pathlib
import random

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

# Gemma's fixed ids: pad 0, eos 1, bos 2, unk 3; "<mask>" sits at 4 in Gemma too.
SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
# Newline and tab are single pieces in Gemma; user-defined here so "\n" is one id everywhere.
USER_PIECES = ["<mask>", "\n", "\t"]
LOC_PIECES = [f"<loc{i:04d}>" for i in range(1024)]
SEG_PIECES = [f"<seg{i:03d}>" for i in range(128)]

TASKS = ["segment", "detect", "caption", "describe", "answer", "find", "locate", "mask", "count"]
LABELS = "water lake river sea ocean pond reservoir canal stream coast shore bay".split()
LANDS = "land field forest road city building farm desert sand cloud snow grass tree".split()
WORDS = """
the of and to in a is that for it as was with be by on not he I this are or his from at which
but have an they you were her she there one all we their has been if more when will would who so
no out up into do any your what some can other than then its only new about also time two may
first after made many over such where most should these could people very through well because
each just those how too little good long make great own under even much same here state place
right still find world big high every year around small large part water river lake sea land
area image map view satellite photo picture aerial top left right bottom centre center north
south east west near far blue green brown grey gray white black dark light bright clear cloudy
shallow deep wide narrow open closed object objects region regions show shows shown mark marked
outline boundary edge edges shape shapes there yes none nothing answer question what where which
how many is are there any in this image picture please segment detect describe caption count
locate find the all every with without between above below inside outside across along next
beside behind front back side corner middle half quarter one two three four five six seven eight
nine ten hundred thousand zero number numbers percent day night morning evening summer winter
spring autumn rain snow sun wind cloud clouds fog ice mountain hill valley plain field fields
forest wood trees road roads street house houses city town village farm farmland crop crops
desert sand beach coast island bridge dam harbour harbor port boat ship car train plane building
buildings roof park garden wall fence path track line lines
""".split()
PUNCTUATION = list(".,;:!?'\"()[]{}-_/\\*+=%&#@<>|~^$")


def build_corpus(seed: int = 0, num_sentences: int = 6000) -> list[str]:
    """Deterministic training sentences: prompts, word salad with digits and punctuation."""
    rng = random.Random(seed)
    corpus = [f"{task} {label}" for task in TASKS for label in LABELS + LANDS]
    corpus += [f"{task} en {label}" for task in TASKS for label in LABELS]
    corpus += ["caption en", "describe en", "answer en how many lakes are there?"]
    for _ in range(num_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 99999)))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.4:
            i = rng.randrange(len(words))
            words[i] += rng.choice(PUNCTUATION)
        sentence = " ".join(words) + rng.choice([".", "?", "!", "", ":"])
        corpus.append(sentence)
    for _ in range(num_sentences // 10):  # suffix-like object lists: "water ; lake ; water"
        corpus.append(" ; ".join(rng.choice(LABELS) for _ in range(rng.randint(2, 8))))
    corpus += ["0 1 2 3 4 5 6 7 8 9", " ".join(PUNCTUATION)]
    return corpus


def train_base_model(corpus: list[str], vocab_size: int) -> bytes:
    """BPE model with Gemma's normaliser and trainer settings; returns the serialized proto."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        split_by_number=True,
        split_by_unicode_script=True,
        allow_whitespace_only_pieces=True,
        treat_whitespace_as_suffix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=SPECIAL_PIECES["pad"],
        eos_piece=SPECIAL_PIECES["eos"],
        bos_piece=SPECIAL_PIECES["bos"],
        unk_piece=SPECIAL_PIECES["unk"],
        user_defined_symbols=USER_PIECES,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def append_user_pieces(model_bytes: bytes, pieces: list[str]) -> bytes:
    """Append `pieces` as user-defined pieces at the end of the vocabulary (ids in order)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    existing = {piece.piece for piece in proto.pieces}
    clashes = [piece for piece in pieces if piece in existing]
    if clashes:
        raise ValueError(f"pieces already in the base vocabulary: {clashes[:5]}")
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for piece in pieces:
        proto.pieces.add(piece=piece, score=0.0, type=user_defined)
    return proto.SerializeToString()


def make_small_tokenizer(vocab_size: int = 1024, seed: int = 0) -> bytes:
    """The complete small tokenizer: base BPE model plus loc and seg pieces."""
    base = train_base_model(build_corpus(seed), vocab_size)
    return append_user_pieces(base, LOC_PIECES + SEG_PIECES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="checkpoints/tokenizer_small.model")
    parser.add_argument("--vocab-size", type=int, default=1024, help="base ids before loc/seg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_bytes = make_small_tokenizer(args.vocab_size, args.seed)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    print(f"wrote {out} ({len(model_bytes)} bytes, {processor.get_piece_size()} ids)")


if __name__ == "__main__":
    main()
