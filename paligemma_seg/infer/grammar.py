"""Constrained decoding: a token-level grammar of segmentation outputs, applied as a logit mask.

The language is the codec's output format, in token ids, over a set of labels L:

    EOS                                        (empty mask: the suffix is the empty string)
  | OBJ (MID_l OBJ)* END_l EOS                 OBJ = <loc>y1 <loc>x1 <loc>y2 <loc>x2 <seg>xS

each MID_l / END_l for any l in L, chosen per object (`segment water ; building` may label each
object water or building). S = `segs_per_object`: 16 for segmentation, 0 for detection (PaliGemma's
`detect a ; b` output, `<loc>x4 a ; <loc>x4 b`). MID_l (label + separator, e.g. " water ; ") and
END_l (label, e.g. " water") are the exact token sequences the tokenizer produces in context;
`from_suffix` / `from_labels` read them off a real two-object suffix, so the grammar fits any
tokenizer. Boxes satisfy y1 + gap_y <= y2 and x1 + gap_x <= x2:
gap 1 is the codec's parse rule (y2 > y1); given the size of the image an output is decoded at, the
gap grows to ceil(1023 / side) so that the box also keeps at least one pixel after the codec's floor
decoding (pixel = floor(loc * side / 1023)). The object count is capped, also by what fits in the
decoding budget (with the longest MID and END of the set), so a constrained output is never cut
short.

The grammar is a small automaton over per-example integer state. `allowed_tokens` and `advance` are
pure jnp functions of (tables, state, ...) meant to run inside the jitted decoding loop:

  state 0          START: <loc> (y1 of the first object) or EOS
  states 1..3      the other three locs: x1, y2 >= y1 + gap_y, x2 >= x1 + gap_x
  states 4..3+S    the S segs (`first_seg_state`)
  states 4+S..     a trie over END_l+[EOS] and MID_l+[<loc>] for every l (`tail_root_state`)
  last state       DONE

At the object cap a state may only take the way out: a <loc> that starts an object, or a literal
that leaves every END_l path (so commits to one more object), is refused; every state reachable
at the cap still lies on some END_l path, so it always has an allowed token.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.segtokens import codec
from paligemma_seg.segtokens.layout import LOCS_PER_BOX, TOKENS_PER_MASK, TOKENS_PER_OBJECT

# Token classes.
OTHER, LOC, SEG, EOS = 0, 1, 2, 3
# What a <loc> token is in a given state.
ROLE_NONE, ROLE_Y1, ROLE_X1, ROLE_Y2, ROLE_X2 = 0, 1, 2, 3, 4

START = 0
FIRST_SEG = LOCS_PER_BOX  # first <seg> state (any segs_per_object)
TAIL_ROOT = FIRST_SEG + TOKENS_PER_MASK  # trie root of the segmentation grammar (16 segs)


def first_seg_state(segs_per_object: int = TOKENS_PER_MASK) -> int:
    """State of an object's first <seg> (with 0 segs, that index is the tail's root)."""
    del segs_per_object  # the segs always follow the four locs
    return LOCS_PER_BOX


def tail_root_state(segs_per_object: int = TOKENS_PER_MASK) -> int:
    """State after an object's last token: the root of the label trie."""
    return LOCS_PER_BOX + segs_per_object


@flax.struct.dataclass
class GrammarTables:
    """Static description of the grammar (a pytree of arrays; pass it into jitted functions).

    V: the model's vocabulary size; S: number of automaton states; K: widest literal branching.
    """

    token_class: jax.Array  # int32[V]: OTHER, LOC, SEG or EOS
    loc_value: jax.Array  # int32[V]: bin of a <loc> token (0..num_bins-1), -1 for other tokens
    allow_loc: jax.Array  # bool[S]
    allow_seg: jax.Array  # bool[S]
    allow_eos: jax.Array  # bool[S]
    loc_role: jax.Array  # int32[S]: ROLE_* of a <loc> read in this state
    loc_next: jax.Array  # int32[S]: state after a <loc>
    seg_next: jax.Array  # int32[S]: state after a <seg>
    literal_ids: jax.Array  # int32[S, K]: allowed plain tokens, padded with V (never matches)
    literal_next: jax.Array  # int32[S, K]: state after each literal
    literal_more: jax.Array  # bool[S, K]: the literal commits to one more object
    max_objects: jax.Array  # int32[]: cap on objects (already reduced to what fits the budget)
    gap: jax.Array  # int32[]: y2 - y1 and x2 - x1 must be >= gap (1 strict, 0 not)
    num_bins: jax.Array  # int32[]: number of <loc> bins (1024)

    @property
    def done_state(self) -> int:
        return self.allow_loc.shape[0] - 1

    @property
    def vocab_size(self) -> int:
        return self.token_class.shape[0]

    @property
    def segs_per_object(self) -> int:
        """<seg> tokens per object (16 segmentation, 0 detection). Concrete tables only (not
        inside jit)."""
        return int(np.count_nonzero(np.asarray(self.allow_seg)))

    @property
    def tail_root(self) -> int:
        """State of the label trie's root. Concrete tables only (not inside jit)."""
        return tail_root_state(self.segs_per_object)


@flax.struct.dataclass
class GrammarState:
    """Per-example automaton state, all int32[B]."""

    state: jax.Array
    objects: jax.Array  # objects started so far
    y1: jax.Array  # y1 bin of the current object
    x1: jax.Array  # x1 bin of the current object
    gap_y: jax.Array  # least y2 - y1 in bins
    gap_x: jax.Array  # least x2 - x1 in bins


def initial_state(
    tables: GrammarTables, batch_size: int, image_sizes: jax.Array | None = None
) -> GrammarState:
    """Start state. `image_sizes` int32[B, 2] (height, width) of the images the outputs are
    decoded at widen the strict gap so no box collapses below one pixel (None: the tables' gap)."""
    zeros = jnp.zeros((batch_size,), jnp.int32)
    gap_y = gap_x = jnp.full((batch_size,), tables.gap, jnp.int32)
    if image_sizes is not None:
        sides = jnp.maximum(jnp.asarray(image_sizes, jnp.int32), 1)
        pixel_gap = -((1 - tables.num_bins) // sides)  # ceil((num_bins - 1) / side)
        pixel_gap = jnp.where(tables.gap > 0, jnp.maximum(pixel_gap, tables.gap), 0)
        gap_y, gap_x = pixel_gap[:, 0], pixel_gap[:, 1]
    return GrammarState(state=zeros, objects=zeros, y1=zeros, x1=zeros, gap_y=gap_y, gap_x=gap_x)


def max_objects_in_budget(
    max_new_tokens: int, mid_len: int, end_len: int, tokens_per_object: int = TOKENS_PER_OBJECT
) -> int:
    """Largest n with T·n + (n-1)·|MID| + |END| + 1 (EOS) <= max_new_tokens, T = tokens per object
    (20 segmentation, 4 detection). With a set of labels pass the longest MID and END."""
    if max_new_tokens < tokens_per_object + end_len + 1:
        return 0
    return (max_new_tokens - 1 - end_len + mid_len) // (tokens_per_object + mid_len)


def split_suffix_tokens(
    ids: Sequence[int],
    loc_ids: Sequence[int],
    seg_ids: Sequence[int],
    segs_per_object: int = TOKENS_PER_MASK,
) -> tuple[list[int], list[int]]:
    """(MID, END) from the token ids of a two-object suffix `OBJ MID OBJ END`."""
    loc_set, seg_set = set(int(i) for i in loc_ids), set(int(i) for i in seg_ids)
    obj = f"{LOCS_PER_BOX} <loc> + {segs_per_object} <seg>"
    expected = f"{obj}, label and separator, {obj}, label"

    def read_object(position: int) -> int:
        pattern = [loc_set] * LOCS_PER_BOX + [seg_set] * segs_per_object
        for offset, allowed in enumerate(pattern):
            if position + offset >= len(ids) or int(ids[position + offset]) not in allowed:
                raise ValueError(f"example suffix ids {list(ids)} are not {expected}")
        return position + len(pattern)

    position = read_object(0)
    mid_start = position
    while position < len(ids) and int(ids[position]) not in loc_set | seg_set:
        position += 1
    mid = [int(i) for i in ids[mid_start:position]]
    end_start = read_object(position)
    end = [int(i) for i in ids[end_start:]]
    if any(i in loc_set | seg_set for i in end):
        raise ValueError(f"example suffix ids {list(ids)} hold more than two objects: {expected}")
    return mid, end


def _token_tables(
    vocab_size: int, loc_ids: Sequence[int], seg_ids: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token_class int32[V], loc_value int32[V]) of a vocabulary layout."""
    token_class = np.full((vocab_size,), OTHER, np.int32)
    loc_value = np.full((vocab_size,), -1, np.int32)
    token_class[np.asarray(loc_ids)] = LOC
    loc_value[np.asarray(loc_ids)] = np.arange(len(loc_ids), dtype=np.int32)
    token_class[np.asarray(seg_ids)] = SEG
    token_class[eos_id] = EOS
    return token_class, loc_value


def _tail_trie(mids: Sequence[list[int]], ends: Sequence[list[int]]) -> list[dict]:
    """Trie over the ways an object's tail can go: some END_l then EOS, or some MID_l then the
    next object.

    Node 0 is the root; each node has `children` (token -> node), `eos` / `loc` (may end there /
    start the next object there) and `on_end` (lies on some END_l path, so it does not commit to
    one more object). ENDs go in first, then MIDs (one label: the same node numbering as ever)."""
    nodes: list[dict] = [{"children": {}, "eos": False, "loc": False, "on_end": True}]
    paths = [(end, True) for end in ends] + [(mid, False) for mid in mids]
    for path, is_end in paths:
        node = 0
        for token in path:
            children = nodes[node]["children"]
            if token not in children:
                children[token] = len(nodes)
                nodes.append({"children": {}, "eos": False, "loc": False, "on_end": False})
            node = children[token]
            nodes[node]["on_end"] |= is_end
        nodes[node]["eos" if is_end else "loc"] = True
    return nodes


def _state_tables(
    nodes: list[dict], vocab_size: int, segs_per_object: int = TOKENS_PER_MASK
) -> dict[str, np.ndarray]:
    """Per-state arrays (see `GrammarTables`) of the automaton with the tail trie `nodes`."""
    first_seg, tail_root = first_seg_state(segs_per_object), tail_root_state(segs_per_object)
    num_states = tail_root + len(nodes) + 1
    done = num_states - 1
    width = max(1, max(len(node["children"]) for node in nodes))
    t = {
        "allow_loc": np.zeros((num_states,), bool),
        "allow_seg": np.zeros((num_states,), bool),
        "allow_eos": np.zeros((num_states,), bool),
        "loc_role": np.zeros((num_states,), np.int32),
        "loc_next": np.full((num_states,), done, np.int32),
        "seg_next": np.full((num_states,), done, np.int32),
        "literal_ids": np.full((num_states, width), vocab_size, np.int32),
        "literal_next": np.full((num_states, width), done, np.int32),
        "literal_more": np.zeros((num_states, width), bool),
    }
    t["allow_eos"][START] = True  # the empty mask
    corners = ((START, ROLE_Y1), (1, ROLE_X1), (2, ROLE_Y2), (3, ROLE_X2))
    for state, role in corners:
        t["allow_loc"][state], t["loc_role"][state], t["loc_next"][state] = True, role, state + 1
    for state in range(first_seg, tail_root):
        t["allow_seg"][state], t["seg_next"][state] = True, state + 1
    for index, node in enumerate(nodes):
        state = tail_root + index
        t["allow_eos"][state] = node["eos"]
        if node["loc"]:
            t["allow_loc"][state], t["loc_role"][state], t["loc_next"][state] = True, ROLE_Y1, 1
        for k, (token, child) in enumerate(sorted(node["children"].items())):
            t["literal_ids"][state, k] = token
            t["literal_next"][state, k] = tail_root + child
            t["literal_more"][state, k] = not nodes[child]["on_end"]
    t["allow_eos"][done] = True  # decoding pads after EOS; this only keeps the mask non-empty.
    return t


def build_labels(
    vocab_size: int,
    loc_ids: Sequence[int],
    seg_ids: Sequence[int],
    eos_id: int,
    mids: Sequence[Sequence[int]],
    ends: Sequence[Sequence[int]],
    max_objects: int,
    max_new_tokens: int,
    strict_boxes: bool = True,
    segs_per_object: int = TOKENS_PER_MASK,
) -> GrammarTables:
    """Tables of the grammar for a vocabulary layout and a set of labels, one (MID, END) each.

    Args:
      vocab_size: the model's vocabulary size V (may exceed the tokenizer's; extra ids are
        never allowed).
      loc_ids: ids of <loc0000>.. in bin order; seg_ids: ids of <seg000>.. (any order).
      eos_id: the end-of-sequence id.
      mids: per label, the tokens between two objects (label + separator).
      ends: per label (same order), the tokens after the last object (label).
      max_objects: cap on the number of objects.
      max_new_tokens: the decoding budget; the cap is lowered so every output ends in it (with
        the longest MID and END of the set).
      strict_boxes: require y2 > y1 and x2 > x1 (else >=).
      segs_per_object: <seg> tokens after each box: 16 (segmentation) or 0 (detection).
    """
    mids = [[int(i) for i in mid] for mid in mids]
    ends = [[int(i) for i in end] for end in ends]
    if not mids or len(mids) != len(ends):
        raise ValueError(f"need one MID and one END per label, got {len(mids)} and {len(ends)}")
    if not 0 <= segs_per_object <= TOKENS_PER_MASK:
        raise ValueError(f"segs_per_object must be in 0..{TOKENS_PER_MASK}, got {segs_per_object}")
    special = set(int(i) for i in loc_ids) | set(int(i) for i in seg_ids) | {int(eos_id)}
    for mid, end in zip(mids, ends, strict=True):
        if special & (set(mid) | set(end)):
            raise ValueError(f"label/separator tokens {mid} / {end} may not be <loc>/<seg>/EOS")
    token_class, loc_value = _token_tables(vocab_size, loc_ids, seg_ids, eos_id)
    states = _state_tables(_tail_trie(mids, ends), vocab_size, segs_per_object)
    budget_cap = max_objects_in_budget(
        max_new_tokens,
        max(len(mid) for mid in mids),
        max(len(end) for end in ends),
        tokens_per_object=LOCS_PER_BOX + segs_per_object,
    )
    return GrammarTables(
        token_class=jnp.asarray(token_class),
        loc_value=jnp.asarray(loc_value),
        **{name: jnp.asarray(value) for name, value in states.items()},
        max_objects=jnp.asarray(min(max_objects, budget_cap), jnp.int32),
        gap=jnp.asarray(1 if strict_boxes else 0, jnp.int32),
        num_bins=jnp.asarray(len(loc_ids), jnp.int32),
    )


def build(
    vocab_size: int,
    loc_ids: Sequence[int],
    seg_ids: Sequence[int],
    eos_id: int,
    mid: Sequence[int],
    end: Sequence[int],
    max_objects: int,
    max_new_tokens: int,
    strict_boxes: bool = True,
) -> GrammarTables:
    """Tables of the segmentation grammar for one label's (MID, END); see `build_labels`."""
    return build_labels(
        vocab_size=vocab_size,
        loc_ids=loc_ids,
        seg_ids=seg_ids,
        eos_id=eos_id,
        mids=[mid],
        ends=[end],
        max_objects=max_objects,
        max_new_tokens=max_new_tokens,
        strict_boxes=strict_boxes,
    )


def from_suffix(
    tokenizer,
    example_suffix: str,
    vocab_size: int,
    max_objects: int,
    max_new_tokens: int,
    strict_boxes: bool = True,
) -> GrammarTables:
    """Tables with MID/END read off `tokenizer.encode(example_suffix)` (two objects)."""
    loc_ids = np.asarray(tokenizer.loc_ids)
    seg_ids = np.asarray(tokenizer.seg_ids)
    mid, end = split_suffix_tokens(tokenizer.encode(example_suffix), loc_ids, seg_ids)
    return build(
        vocab_size=vocab_size,
        loc_ids=loc_ids,
        seg_ids=seg_ids,
        eos_id=tokenizer.eos_id,
        mid=mid,
        end=end,
        max_objects=max_objects,
        max_new_tokens=max_new_tokens,
        strict_boxes=strict_boxes,
    )


def label_suffix(label: str, segs_per_object: int = TOKENS_PER_MASK) -> str:
    """A two-object suffix with `label` on both, written by the codec's own formatter."""
    obj = codec.format_object([1, 2, 300, 400], list(range(segs_per_object)), label)
    return codec.join_objects([obj, obj])


def label_tokens(
    tokenizer, labels: Sequence[str], segs_per_object: int = TOKENS_PER_MASK
) -> tuple[list[list[int]], list[list[int]]]:
    """(MIDs, ENDs) of `labels` (in order) as `tokenizer` writes them in a suffix.

    A label must be non-empty, carry no surrounding spaces, no ";" and no <loc>/<seg> markup, and
    must come back from the tokenizer as written (else the parser would read another label).
    """
    mids, ends = [], []
    loc_ids, seg_ids = np.asarray(tokenizer.loc_ids), np.asarray(tokenizer.seg_ids)
    for label in labels:
        if not isinstance(label, str) or not label.strip() or label != label.strip():
            raise ValueError(f"label {label!r} must be non-empty text without surrounding spaces")
        if ";" in label or codec.parse_suffix(label)[0].problem != "no tokens":
            raise ValueError(f"label {label!r} may not hold ';' or <loc>/<seg> tokens")
        ids = tokenizer.encode(label_suffix(label, segs_per_object))
        mid, end = split_suffix_tokens(ids, loc_ids, seg_ids, segs_per_object)
        if tokenizer.decode(end).strip() != label:
            raise ValueError(
                f"label {label!r} comes back from the tokenizer as {tokenizer.decode(end)!r}"
            )
        mids.append(mid)
        ends.append(end)
    return mids, ends


def from_labels(
    tokenizer,
    labels: Sequence[str],
    vocab_size: int,
    max_objects: int,
    max_new_tokens: int,
    strict_boxes: bool = True,
    segs_per_object: int = TOKENS_PER_MASK,
) -> GrammarTables:
    """Tables of the grammar over a set of labels (each object may take any of them), with each
    label's MID/END read off the tokenizer in context. `segs_per_object=0`: detection."""
    labels = list(dict.fromkeys(labels))  # the order of first appearance, no repeats
    if not labels:
        raise ValueError("from_labels needs at least one label")
    mids, ends = label_tokens(tokenizer, labels, segs_per_object)
    return build_labels(
        vocab_size=vocab_size,
        loc_ids=np.asarray(tokenizer.loc_ids),
        seg_ids=np.asarray(tokenizer.seg_ids),
        eos_id=tokenizer.eos_id,
        mids=mids,
        ends=ends,
        max_objects=max_objects,
        max_new_tokens=max_new_tokens,
        strict_boxes=strict_boxes,
        segs_per_object=segs_per_object,
    )


def allowed_tokens(tables: GrammarTables, state: GrammarState) -> jax.Array:
    """bool[B, V]: the tokens each example may emit next."""
    s = state.state
    vocab = tables.vocab_size
    role = tables.loc_role[s]
    more_ok = state.objects < tables.max_objects  # may start one more object

    lower = jnp.where(role == ROLE_Y2, state.y1 + state.gap_y, 0)
    lower = jnp.where(role == ROLE_X2, state.x1 + state.gap_x, lower)
    upper = tables.num_bins - 1 - jnp.where(role == ROLE_Y1, state.gap_y, 0)
    upper = upper - jnp.where(role == ROLE_X1, state.gap_x, 0)
    loc_ok = tables.allow_loc[s] & ((role != ROLE_Y1) | more_ok)
    value = tables.loc_value[None, :]
    allowed = (tables.token_class[None, :] == LOC) & (
        loc_ok[:, None] & (value >= lower[:, None]) & (value <= upper[:, None])
    )
    allowed |= (tables.token_class[None, :] == SEG) & tables.allow_seg[s][:, None]
    allowed |= (tables.token_class[None, :] == EOS) & tables.allow_eos[s][:, None]

    literal_ok = ~tables.literal_more[s] | more_ok[:, None]  # [B, K]
    literal = jnp.where(literal_ok, tables.literal_ids[s], vocab)
    rows = jnp.broadcast_to(jnp.arange(s.shape[0])[:, None], literal.shape)
    return allowed.at[rows, literal].set(True, mode="drop")


def mask_logits(tables: GrammarTables, state: GrammarState, logits: jax.Array) -> jax.Array:
    """float[B, V] logits with every disallowed token at the dtype's lowest value."""
    allowed = allowed_tokens(tables, state)
    return jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)


def advance(tables: GrammarTables, state: GrammarState, tokens: jax.Array) -> GrammarState:
    """State after each example emits `tokens` (int32[B]); a forbidden token leads to DONE."""
    s = state.state
    token_class = tables.token_class[tokens]
    is_loc = token_class == LOC
    role = jnp.where(is_loc, tables.loc_role[s], ROLE_NONE)
    value = tables.loc_value[tokens]
    matches = tables.literal_ids[s] == tokens[:, None]  # [B, K]
    literal_next = jnp.take_along_axis(
        tables.literal_next[s], jnp.argmax(matches, axis=1)[:, None], axis=1
    )[:, 0]
    done = tables.done_state
    next_state = jnp.where(jnp.any(matches, axis=1), literal_next, done)
    next_state = jnp.where(is_loc, tables.loc_next[s], next_state)
    next_state = jnp.where(token_class == SEG, tables.seg_next[s], next_state)
    next_state = jnp.where(token_class == EOS, done, next_state)
    next_state = jnp.where(s == done, done, next_state)
    return GrammarState(
        state=next_state,
        objects=state.objects + (role == ROLE_Y1).astype(jnp.int32),
        y1=jnp.where(role == ROLE_Y1, value, state.y1),
        x1=jnp.where(role == ROLE_X1, value, state.x1),
        gap_y=state.gap_y,
        gap_x=state.gap_x,
    )
