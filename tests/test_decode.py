"""Cached, looped decoding against the uncached model and against transformers' `generate`.

The models are the tiny random transformers PaliGemma 1/2 of `model_fixtures` (PaliGemma 2 with a
sliding window shorter than the decoded sequence), converted to our tree. Random models greedily
repeat one token, which would hide cache mistakes, so most checks also run under a grammar (on a
fake layout of the 300-token vocabulary) that forces varied tokens: loc, seg, label, separator.
"""

import functools

import jax
import jax.numpy as jnp
import model_fixtures
import numpy as np
import pytest
import torch
import transformers

from paligemma_seg.infer import decode, grammar
from paligemma_seg.model import PaliGemma
from paligemma_seg.weights import params_from_hf_state_dict

MAX_NEW = 24  # one object fits: 4 loc + 16 seg + label + EOS
EOS = 1
PREFIX_LENGTHS = [5, 3, 7]  # left-aligned prompts of different lengths, padded to 7
BATCH = len(PREFIX_LENGTHS)
mask_logits = jax.jit(grammar.mask_logits)
advance = jax.jit(grammar.advance)
allowed_tokens = jax.jit(grammar.allowed_tokens)


@functools.cache
def tiny(version: int):
    """(transformers model, our model, our params) of the same random tiny PaliGemma."""
    hf_model = model_fixtures.build_hf_tiny(version)
    params, _ = params_from_hf_state_dict(hf_model.state_dict(), hf_model.config)
    return hf_model, PaliGemma(model_fixtures.our_tiny_config(version)), params


@functools.cache
def decoder(version: int, cfg: decode.DecodeConfig):
    return decode.make_decode_fn(tiny(version)[1], cfg)


@functools.cache
def fake_grammar() -> grammar.GrammarTables:
    """A grammar over the tiny vocabulary: 128 loc bins at ids 10.., 16 segs at 140.., labels 200+."""
    return grammar.build(
        vocab_size=model_fixtures.TINY_VOCAB,
        loc_ids=np.arange(10, 138),
        seg_ids=np.arange(140, 156),
        eos_id=EOS,
        mid=[200, 201, 202],
        end=[200],
        max_objects=4,
        max_new_tokens=MAX_NEW,
    )


def prompt_batch(version: int) -> dict[str, np.ndarray]:
    config = tiny(version)[1].config
    return model_fixtures.make_batch(config, PREFIX_LENGTHS, [0] * BATCH, seed=version)


def full_forward_greedy(version: int, batch, tables=None) -> np.ndarray:
    """Greedy tokens from re-running the uncached forward pass on prompt + tokens so far."""
    _, model, params = tiny(version)
    lengths = batch["mask_input"].sum(1)
    total = batch["text"].shape[1] + MAX_NEW
    forward = jax.jit(lambda *args: model.apply({"params": params}, batch["image"], *args))
    state = None if tables is None else grammar.initial_state(tables, BATCH)
    generated = np.zeros((BATCH, 0), np.int32)
    for _ in range(MAX_NEW):
        text = np.zeros((BATCH, total), np.int32)
        mask_ar = np.ones((BATCH, total), np.int32)
        mask_input = np.zeros((BATCH, total), np.int32)
        for b in range(BATCH):
            row = np.concatenate([batch["text"][b, : lengths[b]], generated[b]])
            text[b, : len(row)] = row
            mask_ar[b, : lengths[b]] = 0
            mask_input[b, : len(row)] = 1
        logits = forward(text, mask_ar, mask_input)
        logits = logits[jnp.arange(BATCH), lengths + generated.shape[1] - 1]
        if tables is not None:
            logits = mask_logits(tables, state, logits)
        next_tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        if tables is not None:
            state = advance(tables, state, next_tokens)
        generated = np.concatenate([generated, np.asarray(next_tokens)[:, None]], axis=1)
    ended = np.cumsum(generated == EOS, axis=1) - (generated == EOS) > 0
    return np.where(ended, 0, generated)  # padding after EOS


class GrammarProcessor(transformers.LogitsProcessor):
    """Our grammar as a transformers logits processor, advanced by each newly generated id."""

    def __init__(self, tables, prompt_len: int):
        self.tables, self.prompt_len, self.state = tables, prompt_len, None

    def __call__(self, input_ids, scores):
        if self.state is None:
            self.state = grammar.initial_state(self.tables, input_ids.shape[0])
        if input_ids.shape[1] > self.prompt_len:
            last = jnp.asarray(input_ids[:, -1].numpy(), jnp.int32)
            self.state = advance(self.tables, self.state, last)
        allowed = np.array(allowed_tokens(self.tables, self.state))
        return scores.masked_fill(~torch.from_numpy(allowed), -float("inf"))


def transformers_generate(version: int, batch, tables=None, eos=EOS) -> list[list[int]]:
    """transformers' greedy `generate` with its KV cache, one example at a time (no padding)."""
    hf_model, model, _ = tiny(version)
    outputs = []
    for b, length in enumerate(PREFIX_LENGTHS):
        one = {key: value[b : b + 1] for key, value in batch.items()}
        one.update({key: one[key][:, :length] for key in ("text", "mask_ar", "mask_input")})
        inputs = model_fixtures.hf_inputs(one, model.config.num_image_tokens)
        prompt_len = inputs["input_ids"].shape[1]
        processors = [] if tables is None else [GrammarProcessor(tables, prompt_len)]
        with torch.no_grad():
            out = hf_model.generate(
                **inputs,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
                logits_processor=transformers.LogitsProcessorList(processors),
            )
        outputs.append(out[0, prompt_len:].tolist())
    return outputs


# Version 2 decodes with top-1 sampling, which must equal greedy: the sampling path, checked too.
CONFIGS = {
    1: decode.DecodeConfig(MAX_NEW, eos_id=EOS),
    2: decode.DecodeConfig(MAX_NEW, eos_id=EOS, temperature=1.5, top_k=1),
}


@pytest.mark.parametrize("version", [1, 2])
def test_decode_equals_stepwise_argmax_of_full_forward(version):
    batch = prompt_batch(version)
    result = decoder(version, CONFIGS[version])(tiny(version)[2], batch, fake_grammar())
    expected = full_forward_greedy(version, batch, fake_grammar())
    np.testing.assert_array_equal(np.asarray(result.tokens), expected)
    assert result.tokens.dtype == jnp.int32 and result.tokens.shape == (BATCH, MAX_NEW)
    assert len(set(expected.ravel().tolist())) > 10  # varied tokens, so the cache is exercised


@pytest.mark.parametrize("version", [1, 2])
def test_decode_equals_transformers_generate_constrained(version):
    batch = prompt_batch(version)
    result = decoder(version, CONFIGS[version])(tiny(version)[2], batch, fake_grammar())
    ours = decode.output_ids(result)
    theirs = transformers_generate(version, batch, fake_grammar())
    # transformers keeps the EOS it stopped at; ours reports the tokens before it.
    assert theirs == [o + [EOS] if f else o for o, f in zip(ours, result.finished, strict=True)]


def test_decode_equals_transformers_generate_and_stops_each_example_at_eos():
    """Free greedy decoding; EOS is the token example 1 repeats, so it stops at once, others go on."""
    version, batch = 1, prompt_batch(1)
    eos = transformers_generate(version, batch, eos=EOS)[1][0]
    result = decoder(version, decode.DecodeConfig(MAX_NEW, eos_id=eos, pad_id=0))(
        tiny(version)[2], batch
    )
    theirs = transformers_generate(version, batch, eos=eos)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    assert lengths[1] == 0 and tokens[1, 0] == eos and (tokens[1, 1:] == 0).all()
    for b in range(BATCH):
        ended = theirs[b][-1:] == [eos]
        assert bool(result.finished[b]) == ended
        assert lengths[b] == len(theirs[b]) - ended
        np.testing.assert_array_equal(tokens[b, : len(theirs[b])], theirs[b])
        assert (tokens[b, len(theirs[b]) :] == 0).all()  # padding after EOS
    assert lengths.max() == MAX_NEW  # some example never emitted it
    assert decode.output_ids(result) == [t[:n] for t, n in zip(theirs, lengths, strict=True)]


def test_select_tokens_top_k_support_and_seed():
    logits = jnp.asarray([[0.0, 5.0, 4.0, -1.0, 3.0]] * 400)
    pick = lambda seed, k: np.asarray(
        decode.select_tokens(logits, jax.random.PRNGKey(seed), temperature=5.0, top_k=k)
    )
    assert set(pick(0, 2).tolist()) == {1, 2}
    assert set(pick(0, 0).tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(pick(1, 0), pick(1, 0))
    assert not np.array_equal(pick(1, 0), pick(2, 0))
    np.testing.assert_array_equal(decode.select_tokens(logits, None, 0.0, 0), [1] * 400)


def test_decode_config_and_batch_errors():
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.DecodeConfig(0)
    with pytest.raises(ValueError, match="temperature"):
        decode.DecodeConfig(4, temperature=-1.0)
    fn = decode.make_decode_fn(tiny(1)[1], decode.DecodeConfig(4))
    with pytest.raises(ValueError, match="lacks"):
        fn(tiny(1)[2], {"text": np.zeros((1, 2), np.int32)})
    with pytest.raises(ValueError, match="no room"):
        decode.resolve_max_new_tokens(type("D", (), {"max_new_tokens": 0}), 10, 10)
    assert decode.resolve_max_new_tokens(type("D", (), {"max_new_tokens": 0}), 96, 6) == 90


def test_pad_batch_repeats_last_example():
    padded = decode.pad_batch({"text": np.arange(6).reshape(2, 3)}, 4)
    np.testing.assert_array_equal(padded["text"][2:], [[3, 4, 5], [3, 4, 5]])
