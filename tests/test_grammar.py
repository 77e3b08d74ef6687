"""The decoding grammar on a fake vocabulary layout: what it allows, and that sampled outputs always parse."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_seg.infer import grammar

VOCAB = 1200
EOS = 1
PAD = 0
RNG = np.random.default_rng(0)
LOC_IDS = RNG.permutation(np.arange(30, 30 + 1024))  # deliberately not in id order
SEG_IDS = np.arange(1060, 1060 + 128)
WATER, SEMI, SPACE, OTHER_WORD = 5, 6, 7, 9


def make_tables(
    mid=(WATER, SEMI, SPACE), end=(WATER,), max_objects=3, max_new_tokens=128, strict=True
):
    return grammar.build(
        vocab_size=VOCAB,
        loc_ids=LOC_IDS,
        seg_ids=SEG_IDS,
        eos_id=EOS,
        mid=mid,
        end=end,
        max_objects=max_objects,
        max_new_tokens=max_new_tokens,
        strict_boxes=strict,
    )


def reference_parse(ids, mid, end, strict=True):
    """Boxes of a token list in the grammar's language, or None. Written independently of the automaton."""
    loc_bin = {int(t): i for i, t in enumerate(LOC_IDS)}
    seg_set = set(SEG_IDS.tolist())
    ids = list(ids)
    if ids == [EOS]:
        return []
    boxes, position = [], 0
    while True:
        locs = ids[position : position + 4]
        segs = ids[position + 4 : position + 20]
        if len(locs) < 4 or any(t not in loc_bin for t in locs):
            return None
        if len(segs) < 16 or any(t not in seg_set for t in segs):
            return None
        y1, x1, y2, x2 = (loc_bin[t] for t in locs)
        if (y2 - y1 < strict) or (x2 - x1 < strict):
            return None
        boxes.append((y1, x1, y2, x2))
        position += 20
        if ids[position:] == list(end) + [EOS]:
            return boxes
        if ids[position : position + len(mid)] != list(mid):
            return None
        position += len(mid)


@functools.partial(jax.jit, static_argnames=("steps", "batch"))
def sample_constrained(tables, rng, steps, batch):
    """Samples `steps` tokens per example from random logits under the grammar; pads after EOS."""

    def step(carry, rng_step):
        state, finished = carry
        logits_rng, sample_rng = jax.random.split(rng_step)
        logits = 3.0 * jax.random.normal(logits_rng, (batch, VOCAB))
        logits = logits.at[:, EOS].add(2.0)  # some short outputs too
        tokens = jax.random.categorical(sample_rng, grammar.mask_logits(tables, state, logits))
        tokens = jnp.where(finished, PAD, tokens)
        return (grammar.advance(tables, state, tokens), finished | (tokens == EOS)), tokens

    init = (grammar.initial_state(tables, batch), jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, init, jax.random.split(rng, steps))
    return tokens.T


def strip(row):
    row = list(np.asarray(row))
    return row[: row.index(EOS) + 1] if EOS in row else row


def allowed_set(tables, state):
    return set(np.flatnonzero(np.asarray(grammar.allowed_tokens(tables, state))[0]).tolist())


def single(state, objects=0, y1=0, x1=0, gap=1):
    values = (state, objects, y1, x1, gap, gap)
    return grammar.GrammarState(*(jnp.asarray([v], jnp.int32) for v in values))


def test_grammar_start_allows_any_loc_or_eos():
    tables = make_tables()
    allowed = allowed_set(tables, grammar.initial_state(tables, 1))
    # strict boxes: y1 can be at most bin 1022, so that some y2 > y1 remains.
    assert allowed == (set(LOC_IDS[:1023].tolist()) | {EOS})


def test_grammar_second_corner_respects_first():
    tables = make_tables()
    state = grammar.advance(tables, grammar.initial_state(tables, 1), jnp.asarray([LOC_IDS[700]]))
    state = grammar.advance(tables, state, jnp.asarray([LOC_IDS[10]]))
    assert int(state.y1[0]) == 700 and int(state.x1[0]) == 10 and int(state.objects[0]) == 1
    assert allowed_set(tables, state) == set(LOC_IDS[701:].tolist())
    state = grammar.advance(tables, state, jnp.asarray([LOC_IDS[701]]))
    assert allowed_set(tables, state) == set(LOC_IDS[11:].tolist())
    non_strict = make_tables(strict=False)
    assert allowed_set(non_strict, single(2, 1, y1=700, gap=0)) == set(LOC_IDS[700:].tolist())


def test_grammar_gap_from_image_size_keeps_boxes_a_pixel_wide():
    """At 100 x 1023 px a box needs y2 - y1 >= ceil(1023 / 100) = 11 bins, x2 - x1 >= 1."""
    tables = make_tables()
    state = grammar.initial_state(tables, 1, jnp.asarray([[100, 1023]]))
    assert (int(state.gap_y[0]), int(state.gap_x[0])) == (11, 1)
    assert allowed_set(tables, state) == set(LOC_IDS[: 1024 - 11].tolist()) | {EOS}
    for token in (LOC_IDS[500], LOC_IDS[7]):
        state = grammar.advance(tables, state, jnp.asarray([token]))
    assert allowed_set(tables, state) == set(LOC_IDS[511:].tolist())
    # floor decoding keeps every allowed box at least one pixel tall.
    for y1 in range(0, 1024 - 11):
        assert (y1 + 11) * 100 // 1023 > y1 * 100 // 1023
    non_strict = make_tables(strict=False)
    assert int(grammar.initial_state(non_strict, 1, jnp.asarray([[100, 50]])).gap_y[0]) == 0


def test_grammar_tail_branches_between_end_and_next_object():
    tables = make_tables(max_objects=2)
    tail = grammar.TAIL_ROOT
    assert allowed_set(tables, single(tail, objects=1)) == {WATER}
    after_label = grammar.advance(tables, single(tail, objects=1), jnp.asarray([WATER]))
    assert allowed_set(tables, after_label) == {EOS, SEMI}
    # At the object cap, the separator (which commits to another object) is no longer allowed.
    capped = grammar.advance(tables, single(tail, objects=2), jnp.asarray([WATER]))
    assert allowed_set(tables, capped) == {EOS}


def test_grammar_end_not_prefix_of_mid():
    tables = make_tables(mid=(OTHER_WORD, SPACE), end=(WATER,), max_objects=5)
    assert allowed_set(tables, single(grammar.TAIL_ROOT, objects=1)) == {WATER, OTHER_WORD}
    assert allowed_set(tables, single(grammar.TAIL_ROOT, objects=5)) == {WATER}


def test_grammar_forbidden_token_goes_to_done():
    tables = make_tables()
    state = grammar.advance(tables, grammar.initial_state(tables, 1), jnp.asarray([SEG_IDS[0]]))
    assert int(state.state[0]) == tables.done_state


@pytest.mark.parametrize(
    ("max_new_tokens", "expected"),
    [(21, 0), (22, 1), (44, 1), (45, 2), (67, 2), (68, 3)],
)
def test_grammar_budget_caps_objects(max_new_tokens, expected):
    # n objects cost 20n + 3(n-1) + 1 + 1 tokens with MID of 3 and END of 1.
    assert grammar.max_objects_in_budget(max_new_tokens, mid_len=3, end_len=1) == expected
    tables = make_tables(max_objects=10, max_new_tokens=max_new_tokens)
    assert int(tables.max_objects) == expected


def test_grammar_budget_zero_allows_only_eos():
    tables = make_tables(max_new_tokens=10)
    assert allowed_set(tables, grammar.initial_state(tables, 1)) == {EOS}


@pytest.mark.parametrize(
    ("mid", "end", "max_objects", "steps"),
    [((WATER, SEMI, SPACE), (WATER,), 3, 80), ((OTHER_WORD, SPACE), (WATER, SEMI), 8, 60)],
)
def test_grammar_sampled_outputs_always_parse(mid, end, max_objects, steps):
    tables = make_tables(mid=mid, end=end, max_objects=max_objects, max_new_tokens=steps)
    tokens = np.asarray(sample_constrained(tables, jax.random.PRNGKey(1), steps=steps, batch=256))
    counts = []
    for row in tokens:
        ids = strip(row)
        assert ids[-1] == EOS, f"output did not end within the budget: {ids}"
        boxes = reference_parse(ids, mid, end)
        assert boxes is not None, f"unparseable constrained output: {ids}"
        assert len(boxes) <= min(
            max_objects, grammar.max_objects_in_budget(steps, len(mid), len(end))
        )
        counts.append(len(boxes))
    assert 0 in counts and max(counts) >= 2  # the samples explore empty and multi-object outputs


def test_split_suffix_tokens_reads_mid_and_end():
    obj = [int(t) for t in LOC_IDS[[1, 2, 3, 4]]] + SEG_IDS[:16].tolist()
    mid, end = grammar.split_suffix_tokens(
        obj + [WATER, SEMI, SPACE] + obj + [WATER], LOC_IDS, SEG_IDS
    )
    assert (mid, end) == ([WATER, SEMI, SPACE], [WATER])
    with pytest.raises(ValueError, match="not 4 <loc>"):
        grammar.split_suffix_tokens(obj[:3] + obj[4:] + [WATER] + obj + [WATER], LOC_IDS, SEG_IDS)
    with pytest.raises(ValueError, match="more than two objects"):
        grammar.split_suffix_tokens(obj + [WATER] + obj + [WATER] + obj, LOC_IDS, SEG_IDS)


def test_grammar_rejects_special_ids_in_label():
    with pytest.raises(ValueError, match="may not be"):
        make_tables(mid=(int(SEG_IDS[0]),))


@pytest.mark.parametrize("label", ["water", "body of water"])
def test_grammar_from_small_tokenizer_reads_label_and_separator(label):
    from paligemma_seg.infer import segmenter as segmenter_lib
    from paligemma_seg.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(
        pathlib.Path(__file__).parents[1] / "checkpoints" / "tokenizer_small.model"
    )
    suffix = segmenter_lib.example_suffix(label)
    mid, end = grammar.split_suffix_tokens(
        tokenizer.encode(suffix), tokenizer.loc_ids, tokenizer.seg_ids
    )
    assert tokenizer.decode(end).strip() == label
    assert tokenizer.decode(mid).split() == [*label.split(), ";"]
    tables = grammar.from_suffix(
        tokenizer, suffix, vocab_size=2304, max_objects=8, max_new_tokens=64
    )
    assert tables.vocab_size == 2304  # model rows beyond the tokenizer's are never allowed
    assert int(tables.max_objects) == grammar.max_objects_in_budget(64, len(mid), len(end))
    assert not np.asarray(tables.token_class)[tokenizer.vocab_size :].any()


# ---------- a set of labels and detection, on the project's small tokenizer

SMALL_VOCAB = 2304  # the tiny model's rows: more than the tokenizer's 2176 ids
LABELS = ("water", "water body", "road")  # "water" is a prefix of "water body": a shared trie path


@functools.cache
def small_tokenizer():
    from paligemma_seg.tokenizer import Tokenizer

    return Tokenizer.load(
        pathlib.Path(__file__).parents[1] / "checkpoints" / "tokenizer_small.model"
    )


def tables_digest(tables) -> str:
    """sha256 over every array of the tables, in field order."""
    import dataclasses
    import hashlib

    digest = hashlib.sha256()
    for field in dataclasses.fields(tables):
        value = np.asarray(getattr(tables, field.name))
        digest.update(f"{field.name}{value.shape}".encode())
        digest.update(value.astype(np.int64).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("label", "max_objects", "max_new_tokens", "strict", "expected"),
    [
        ("water", 8, 200, True, "aee03942ec11f955c6e240a8bd4df0cfab7424c0da68deea87ce183996f6f338"),
        (
            "body of water",
            3,
            64,
            False,
            "ab2e811245f5353c9ad00b5515ae31f61a3dad1ed6440b921084dae1c63d6b6e",
        ),
    ],
)
def test_single_label_tables_are_the_previous_ones(
    label, max_objects, max_new_tokens, strict, expected
):
    """Digests of the one-label grammar before the set of labels came (the same arrays, bit for bit)."""
    from paligemma_seg.infer import segmenter as segmenter_lib

    tokenizer = small_tokenizer()
    args = (SMALL_VOCAB, max_objects, max_new_tokens, strict)
    suffix = segmenter_lib.example_suffix(label)
    assert tables_digest(grammar.from_suffix(tokenizer, suffix, *args)) == expected
    assert tables_digest(grammar.from_labels(tokenizer, [label], *args)) == expected
    assert grammar.label_suffix(label) == suffix


def test_build_is_build_labels_with_one_label():
    one = make_tables(mid=(OTHER_WORD, SPACE), end=(WATER, SEMI), max_objects=4)
    labels = grammar.build_labels(
        VOCAB, LOC_IDS, SEG_IDS, EOS, [(OTHER_WORD, SPACE)], [(WATER, SEMI)], 4, 128
    )
    assert tables_digest(one) == tables_digest(labels)
    assert one.tail_root == grammar.TAIL_ROOT and one.segs_per_object == 16


def test_label_set_tail_allows_every_label_and_only_end_paths_at_the_cap():
    # labels: water (END [WATER], MID [WATER SEMI SPACE]) and other (END [OTHER_WORD], MID [OTHER_WORD SEMI SPACE]).
    tables = grammar.build_labels(
        VOCAB,
        LOC_IDS,
        SEG_IDS,
        EOS,
        mids=[(WATER, SEMI, SPACE), (OTHER_WORD, SEMI, SPACE)],
        ends=[(WATER,), (OTHER_WORD,)],
        max_objects=2,
        max_new_tokens=128,
    )
    tail = grammar.TAIL_ROOT
    assert allowed_set(tables, single(tail, objects=1)) == {WATER, OTHER_WORD}
    for label in (WATER, OTHER_WORD):
        after = grammar.advance(tables, single(tail, objects=1), jnp.asarray([label]))
        assert allowed_set(tables, after) == {EOS, SEMI}
        capped = grammar.advance(tables, single(tail, objects=2), jnp.asarray([label]))
        assert allowed_set(tables, capped) == {EOS}
    # A label only reachable as MID (its END differs) is refused at the cap.
    mixed = grammar.build_labels(
        VOCAB,
        LOC_IDS,
        SEG_IDS,
        EOS,
        [(WATER, SEMI), (OTHER_WORD, SPACE)],
        [(WATER,), (SPACE,)],
        2,
        128,
    )
    assert allowed_set(mixed, single(tail, objects=1)) == {WATER, OTHER_WORD, SPACE}
    assert allowed_set(mixed, single(tail, objects=2)) == {WATER, SPACE}


@pytest.mark.parametrize(
    ("segs", "mid_lens", "end_lens", "max_new_tokens", "expected"),
    [
        (16, (3, 6), (1, 4), 25, 1),  # 20 + 4 + EOS
        (16, (3, 6), (1, 4), 50, 1),  # two objects need 20 + 6 + 20 + 4 + 1 = 51
        (16, (3, 6), (1, 4), 51, 2),
        (0, (3,), (1,), 6, 1),  # detection: 4 + 1 + EOS
        (0, (3,), (1,), 12, 1),  # two need 4 + 3 + 4 + 1 + 1 = 13
        (0, (3,), (1,), 13, 2),
    ],
)
def test_label_set_budget_uses_the_longest_mid_and_end(
    segs, mid_lens, end_lens, max_new_tokens, expected
):
    words = iter(range(2, 30))
    mids = [[next(words) for _ in range(n)] for n in mid_lens]
    ends = [[next(words) for _ in range(n)] for n in end_lens]
    tables = grammar.build_labels(
        VOCAB, LOC_IDS, SEG_IDS, EOS, mids, ends, 10, max_new_tokens, segs_per_object=segs
    )
    assert int(tables.max_objects) == expected


def test_detection_tables_have_no_seg_states():
    tables = grammar.build_labels(
        VOCAB, LOC_IDS, SEG_IDS, EOS, [(WATER, SEMI, SPACE)], [(WATER,)], 3, 128, segs_per_object=0
    )
    assert tables.segs_per_object == 0 and tables.tail_root == grammar.tail_root_state(0) == 4
    state = grammar.initial_state(tables, 1)
    for token in LOC_IDS[[5, 6, 7, 8]]:
        assert int(token) in allowed_set(tables, state)
        state = grammar.advance(tables, state, jnp.asarray([token]))
    assert int(state.state[0]) == tables.tail_root
    assert allowed_set(tables, state) == {WATER}
    assert not np.asarray(tables.allow_seg).any()


def test_from_labels_rejects_labels_the_parser_would_misread():
    tokenizer = small_tokenizer()
    for label in ("", " water", "water ; road", "<loc0001>water"):
        with pytest.raises(ValueError, match="label"):
            grammar.from_labels(tokenizer, ["road", label], SMALL_VOCAB, 4, 128)
    with pytest.raises(ValueError, match="at least one"):
        grammar.from_labels(tokenizer, [], SMALL_VOCAB, 4, 128)


def test_split_suffix_tokens_of_detection_objects():
    tokenizer = small_tokenizer()
    suffix = grammar.label_suffix("water body", segs_per_object=0)
    mid, end = grammar.split_suffix_tokens(
        tokenizer.encode(suffix), tokenizer.loc_ids, tokenizer.seg_ids, segs_per_object=0
    )
    assert tokenizer.decode(end).strip() == "water body"
    assert tokenizer.decode(mid).split() == ["water", "body", ";"]
    with pytest.raises(ValueError, match="4 <loc> \\+ 16 <seg>"):
        grammar.split_suffix_tokens(tokenizer.encode(suffix), tokenizer.loc_ids, tokenizer.seg_ids)


@jax.jit
def automaton_accepts(tables, tokens, lengths):
    """bool[B]: every one of the first `lengths` tokens of each row is allowed where it comes."""
    rows = jnp.arange(tokens.shape[0])

    def step(carry, t):
        state, ok = carry
        token = tokens[:, t]
        allowed = grammar.allowed_tokens(tables, state)[rows, token]
        return (grammar.advance(tables, state, token), ok & ((t >= lengths) | allowed)), None

    init = (grammar.initial_state(tables, tokens.shape[0]), jnp.ones(tokens.shape[:1], bool))
    return jax.lax.scan(step, init, jnp.arange(tokens.shape[1]))[0][1]


def accepted(tables, sequences) -> list[bool]:
    """The automaton's verdict on token lists: every token allowed, EOS once and last (decoding
    stops at the first EOS, so that is the language)."""
    tokenizer = small_tokenizer()
    width = max(len(ids) for ids in sequences)
    tokens = np.full((len(sequences), width), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = ids
    lengths = np.asarray([len(ids) for ids in sequences], np.int32)
    ok = np.asarray(automaton_accepts(tables, jnp.asarray(tokens), jnp.asarray(lengths)))
    eos = tokenizer.eos_id
    return [
        bool(good) and ids.count(eos) == 1 and ids[-1] == eos
        for good, ids in zip(ok, sequences, strict=True)
    ]


def segmentation_oracle(ids, labels, cap) -> bool:
    """Accepted iff the text parses (codec), every object valid with a label of the set, at most
    `cap` objects, and the ids are the tokenizer's own encoding of that output."""
    from paligemma_seg.segtokens import codec

    tokenizer = small_tokenizer()
    if ids.count(tokenizer.eos_id) != 1 or ids[-1] != tokenizer.eos_id:
        return False
    parsed = codec.parse_suffix(tokenizer.decode(ids[:-1]))
    if len(parsed) > cap or any(p.problem is not None or p.label not in labels for p in parsed):
        return False
    canonical = [codec.format_object(p.locs, p.codes, p.label) for p in parsed]
    return ids[:-1] == tokenizer.encode(codec.join_objects(canonical))


def detection_oracle(ids, labels, cap) -> bool:
    """Detection, checked on the text with a regex: `<loc>x4 label` objects joined by " ; "."""
    import re

    tokenizer = small_tokenizer()
    if ids.count(tokenizer.eos_id) != 1 or ids[-1] != tokenizer.eos_id:
        return False
    text = tokenizer.decode(ids[:-1])
    chunks = text.split(" ; ") if text else []
    for chunk in chunks:
        match = re.fullmatch(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> (.+)", chunk)
        if not match or match.group(5) not in labels:
            return False
        y1, x1, y2, x2 = (int(match.group(i)) for i in range(1, 5))
        if not (y2 > y1 and x2 > x1):
            return False
    return len(chunks) <= cap and ids[:-1] == tokenizer.encode(text)


def random_outputs(rng, labels, cap, segs, count) -> list[list[int]]:
    """Well-formed outputs of 0..cap+1 objects (some boxes flat or inverted), then 0-2 random
    edits from an alphabet of label, separator, other-word, loc, seg and EOS tokens."""
    from paligemma_seg.segtokens import codec

    tokenizer = small_tokenizer()
    alphabet = sorted(
        {i for text in [*labels, " ; ", " house", " water ;", " ;"] for i in tokenizer.encode(text)}
    )
    sequences = []
    for _ in range(count):
        objects = []
        for _ in range(rng.integers(0, cap + 2)):
            y, x = (
                np.sort(rng.choice(1024, 2, replace=False)),
                np.sort(rng.choice(1024, 2, replace=False)),
            )
            if rng.random() < 0.1:
                y = y[::-1] if rng.random() < 0.5 else y[:1].repeat(2)
            codes = rng.integers(0, 128, segs)
            objects.append(codec.format_object([y[0], x[0], y[1], x[1]], codes, rng.choice(labels)))
        ids = tokenizer.encode(codec.join_objects(objects)) + [tokenizer.eos_id]
        for _ in range(rng.choice(3, p=[0.35, 0.45, 0.2])):
            position = int(rng.integers(0, len(ids) + 1))
            kind = rng.integers(0, 6)
            if kind == 0 and position < len(ids):
                del ids[position]
            elif kind == 1:
                ids.insert(position, int(rng.choice(alphabet)))
            elif kind == 2 and position < len(ids):
                ids[position] = int(rng.choice(alphabet))
            elif kind == 3 and position < len(ids):
                ids[position] = int(rng.choice(tokenizer.loc_ids))  # may invert a box
            elif kind == 4:
                ids.insert(position, int(rng.choice(tokenizer.seg_ids)))
            else:
                ids = ids[:position] + ids[position : position + 3] + ids[position:]  # repeats
        if ids:
            sequences.append(ids)
    return sequences


@pytest.mark.parametrize(
    ("segs", "oracle"),
    [(16, segmentation_oracle), (0, detection_oracle)],
    ids=["segment", "detect"],
)
def test_label_set_automaton_accepts_exactly_what_parses(segs, oracle):
    cap = 3
    tables = grammar.from_labels(
        small_tokenizer(), LABELS, SMALL_VOCAB, cap, max_new_tokens=400, segs_per_object=segs
    )
    assert int(tables.max_objects) == cap
    sequences = random_outputs(np.random.default_rng(segs), LABELS, cap, segs, count=1500)
    verdicts = accepted(tables, sequences)
    expected = [oracle(ids, LABELS, cap) for ids in sequences]
    wrong = [
        ids for ids, got, want in zip(sequences, verdicts, expected, strict=True) if got != want
    ]
    assert not wrong, (
        f"{len(wrong)} disagreements, e.g. {small_tokenizer().decode(wrong[0])!r} {wrong[0]}"
    )
    assert 300 < sum(expected) < len(sequences) - 300  # both verdicts well represented
    # Over the cap: a canonical output of cap + 1 objects is refused.
    too_many = [
        ids for ids in sequences if oracle(ids, LABELS, cap + 1) and not oracle(ids, LABELS, cap)
    ]
    assert too_many and not any(accepted(tables, too_many))


def reachable_configurations_never_dead(tables, max_new_tokens, image_size=None):
    """Walks every configuration reachable from the start (locs by their lowest and highest
    allowed bin, segs by one code, every literal) for `max_new_tokens` steps: each live one must
    allow some token, and all must have emitted EOS by the end of the budget."""
    sizes = None if image_size is None else jnp.asarray([image_size], jnp.int32)
    start = grammar.initial_state(tables, 1, sizes)
    fields = ("state", "objects", "y1", "x1", "gap_y", "gap_x")
    live = {tuple(int(getattr(start, f)[0]) for f in fields)}
    token_class = np.asarray(tables.token_class)
    max_seen = 0
    for _ in range(max_new_tokens):
        if not live:
            return max_seen
        configs = sorted(live)
        batch = grammar.GrammarState(
            *(jnp.asarray(c, jnp.int32) for c in zip(*configs, strict=True))
        )
        allowed = np.asarray(grammar.allowed_tokens(tables, batch))
        rows, tokens = [], []
        for row, config in enumerate(configs):
            ids = np.flatnonzero(allowed[row])
            assert ids.size, f"dead configuration {dict(zip(fields, config, strict=True))}"
            max_seen = max(max_seen, config[1])
            locs = ids[token_class[ids] == grammar.LOC]
            segs = ids[token_class[ids] == grammar.SEG]
            literals = ids[token_class[ids] == grammar.OTHER]
            chosen = [*locs[:1], *locs[-1:], *segs[:1], *literals]  # EOS ends that path
            rows += [row] * len(chosen)
            tokens += [int(t) for t in chosen]
        if not tokens:
            return max_seen
        index = np.asarray(rows)
        before = grammar.GrammarState(*(getattr(batch, f)[index] for f in fields))
        after = grammar.advance(tables, before, jnp.asarray(tokens, jnp.int32))
        live = set(zip(*(np.asarray(getattr(after, f)).tolist() for f in fields), strict=True))
    assert not live, f"{len(live)} configurations still running after {max_new_tokens} tokens"
    return max_seen


@pytest.mark.parametrize(
    ("segs", "max_objects", "max_new_tokens"),
    [(16, 2, 400), (16, 10, 70), (0, 3, 400), (0, 10, 30)],
    ids=["segment-cap", "segment-budget", "detect-cap", "detect-budget"],
)
def test_label_set_at_the_cap_no_state_is_dead_and_outputs_end_in_budget(
    segs, max_objects, max_new_tokens
):
    tables = grammar.from_labels(
        small_tokenizer(), LABELS, SMALL_VOCAB, max_objects, max_new_tokens, segs_per_object=segs
    )
    cap = int(tables.max_objects)
    assert 1 <= cap <= max_objects
    # The walk reaches the cap, never passes it, and every walk ends with EOS within the budget.
    assert reachable_configurations_never_dead(tables, max_new_tokens) == cap
    assert reachable_configurations_never_dead(tables, max_new_tokens, (100, 37)) == cap


@functools.partial(jax.jit, static_argnames=("steps", "batch"))
def greedy_random_logits(tables, rng, steps, batch):
    """Greedy decoding of random logits under the grammar (pads after EOS), as decode.py does."""
    eos, pad = small_tokenizer().eos_id, small_tokenizer().pad_id

    def step(carry, rng_step):
        state, finished = carry
        logits = jax.random.normal(rng_step, (batch, tables.vocab_size)).at[:, eos].add(1.0)
        tokens = jnp.argmax(grammar.mask_logits(tables, state, logits), axis=-1).astype(jnp.int32)
        tokens = jnp.where(finished, pad, tokens)
        return (grammar.advance(tables, state, tokens), finished | (tokens == eos)), tokens

    init = (grammar.initial_state(tables, batch), jnp.zeros((batch,), bool))
    return jax.lax.scan(step, init, jax.random.split(rng, steps))[1].T


def test_label_set_greedy_outputs_parse_with_labels_of_the_set():
    from paligemma_seg.segtokens import codec

    tokenizer = small_tokenizer()
    steps = 90
    tables = grammar.from_labels(tokenizer, LABELS, SMALL_VOCAB, 8, max_new_tokens=steps)
    tokens = np.asarray(greedy_random_logits(tables, jax.random.PRNGKey(3), steps=steps, batch=128))
    seen_labels, counts = set(), []
    for row in tokens:
        ids = list(row)
        assert tokenizer.eos_id in ids, f"output cut short: {tokenizer.decode(ids)!r}"
        text = tokenizer.decode(ids[: ids.index(tokenizer.eos_id)])
        parsed = codec.parse_suffix(text)
        assert all(p.problem is None and p.label in LABELS for p in parsed), text
        assert len(parsed) <= int(tables.max_objects)
        seen_labels |= {p.label for p in parsed}
        counts.append(len(parsed))
    assert seen_labels == set(LABELS) and 0 in counts and max(counts) >= 2
