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
