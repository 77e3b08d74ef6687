"""Decoding speed: our jitted prefill + KV-cache loop vs transformers' `generate`, same weights.

    python scripts/bench_decode.py [--batch 8] [--new-tokens 64] [--prompt-len 16] [--repeats 3]

The default model is the training benchmark's: SigLIP 4 layers, width 256, 112 px, patch 14 (64
image tokens); Gemma 4 layers, width 512, 8 heads, 1 KV head, head_dim 64, MLP 2048, vocabulary
2304 (PaliGemma 1 architecture, float32). transformers builds it with random weights; ours are the
same tensors, converted. Both decode greedily with a KV cache and never stop early (no EOS), so
both produce batch x new-tokens tokens; compilation / warm-up is excluded from the timing. The
tokens of both are compared (they should agree). The last line is one JSON object:
{"ours_tok_per_s", "torch_tok_per_s", "speedup", ...}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench_common import print_summary  # noqa: E402

from paligemma_seg.infer import decode  # noqa: E402
from paligemma_seg.model import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig  # noqa: E402
from paligemma_seg.weights import config as weights_config  # noqa: E402
from paligemma_seg.weights import params_from_hf_state_dict  # noqa: E402

VISION = dict(width=256, depth=4, mlp_dim=1024, num_heads=4, patch_size=14, image_size=112)
LLM = dict(  # GemmaConfig fields
    width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64, vocab_size=2304
)


def our_config() -> PaliGemmaConfig:
    return PaliGemmaConfig(vision=SiglipConfig(**VISION), llm=GemmaConfig(**LLM))


def hf_config() -> transformers.PaliGemmaConfig:
    """The same model as a transformers config, written by the project's own exporter."""
    config_json = weights_config.hf_config_json(our_config(), "float32")
    return transformers.PaliGemmaConfig(**config_json, attn_implementation="sdpa")


def make_inputs(batch: int, prompt_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images in [-1, 1] and full-length random prompts (no padding: same work for both)."""
    rng = np.random.default_rng(seed)
    side = VISION["image_size"]
    return {
        "image": rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32),
        "text": rng.integers(3, LLM["vocab_size"], (batch, prompt_len)).astype(np.int32),
        "mask_ar": np.zeros((batch, prompt_len), np.int32),
        "mask_input": np.ones((batch, prompt_len), np.int32),
    }


def time_best(fn, repeats: int) -> tuple[float, object]:
    """Fastest of `repeats` timed calls (after the caller's warm-up), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    hf_model = transformers.PaliGemmaForConditionalGeneration(hf_config()).eval()
    params, _ = params_from_hf_state_dict(hf_model.state_dict(), hf_model.config)
    params = jax.device_put(params)
    model = PaliGemma(our_config())
    inputs = make_inputs(args.batch, args.prompt_len)
    tokens = args.batch * args.new_tokens

    # No EOS for either side: -1 never matches a token, transformers gets eos_token_id=None.
    # Per-layer weights (the CPU default, DecodeConfig.unstack_layers) and the stacked tree.
    timed = {}
    for unstack in (False, True):
        settings = decode.DecodeConfig(
            max_new_tokens=args.new_tokens, eos_id=-1, unstack_layers=unstack
        )
        fn = decode.make_decode_fn(model, settings)
        start = time.perf_counter()
        jax.block_until_ready(fn(params, inputs).tokens)
        compile_s = time.perf_counter() - start
        run = lambda fn=fn: jax.block_until_ready(fn(params, inputs).tokens)
        timed[unstack] = time_best(run, args.repeats)
    ours_s, ours = timed[True]
    stacked_s, stacked = timed[False]

    num_image = our_config().num_image_tokens
    image_ids = np.full((args.batch, num_image), LLM["vocab_size"], np.int64)
    hf_inputs = {
        "input_ids": torch.from_numpy(np.concatenate([image_ids, inputs["text"]], 1)),
        "attention_mask": torch.ones(args.batch, num_image + args.prompt_len, dtype=torch.long),
        "token_type_ids": torch.zeros(args.batch, num_image + args.prompt_len, dtype=torch.long),
        "pixel_values": torch.from_numpy(inputs["image"].transpose(0, 3, 1, 2).copy()),
    }

    def generate():
        with torch.inference_mode():
            return hf_model.generate(
                **hf_inputs,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )

    generate()  # warm-up
    torch_s, theirs = time_best(generate, args.repeats)
    theirs = theirs[:, -args.new_tokens :].numpy()
    agree = float(np.mean(np.asarray(ours) == theirs))

    print(f"device: {jax.devices()[0].device_kind}; torch threads: {torch.get_num_threads()}")
    print(f"batch {args.batch}, prompt {num_image} image + {args.prompt_len} text tokens")
    print(f"ours:         {ours_s * 1e3:8.1f} ms  {tokens / ours_s:9.1f} tok/s")
    print(f"ours stacked: {stacked_s * 1e3:8.1f} ms  {tokens / stacked_s:9.1f} tok/s")
    print(f"              (compile + first call {compile_s:.1f} s, not timed)")
    print(f"transformers: {torch_s * 1e3:8.1f} ms  {tokens / torch_s:9.1f} tok/s")
    print(f"speedup: {torch_s / ours_s:.2f}x; identical tokens: {agree:.1%}")
    print_summary(
        {
            "ours_tok_per_s": round(tokens / ours_s, 1),
            "torch_tok_per_s": round(tokens / torch_s, 1),
            "speedup": round(torch_s / ours_s, 2),
            "token_agreement": agree,
            "ours_stacked_tok_per_s": round(tokens / stacked_s, 1),
            "stacked_token_agreement": float(np.mean(np.asarray(stacked) == theirs)),
            "batch": args.batch,
            "new_tokens": args.new_tokens,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
