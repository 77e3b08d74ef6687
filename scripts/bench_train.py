"""Train-step throughput: our jitted JAX step vs transformers + torch on the same small PaliGemma.

    python scripts/bench_train.py [--steps 10] [--repeats 3] [--no-compile]

Same architecture (random weights), same batch and sequence, same machine and run: SigLIP 4 layers,
width 256, 112 px, patch 14 (64 image tokens); Gemma 4 layers, width 512, 8 heads, 1 KV head, head
dim 64, MLP 2048, vocabulary 2304; batch 8, 64 text tokens of which 48 are supervised suffix; every
parameter trains with AdamW (global-norm clip 1.0). Both sides do forward, backward and the update.
Ours runs in float32 and with bfloat16 compute (float32 master weights); torch runs float32 eager
and, if it compiles, `torch.compile`, each also under `torch.autocast(bfloat16)` (float32 master
weights, bf16 matmuls: the like-with-like peer of our bf16 step). Each variant runs in a fresh
process, one after another (in one process the frameworks slowed each other down). The step's
FLOPs come from XLA's cost analysis of our fp32 step; the machine's matmul peak is measured in the
same run (2048^3 fp32/bf16 matmuls, best of JAX and torch). The last line is one JSON object:
ours_ex_per_s, torch_ex_per_s (best torch fp32 variant), torch_bf16_ex_per_s (best torch autocast
variant), speedup (ours fp32 / torch's best fp32), speedup_bf16 (ours bf16 / torch's best bf16
autocast) and speedup_bf16_vs_torch_fp32, plus the details.

Parameter-efficient steps on the same model, same run (bf16 compute, frozen weights in bf16,
AdamW): attention-only (`optim.trainable='attn'`), LoRA r=16 on the LLM's projections
(`optim.lora`, nothing else trains) and LoRA r=16 with int8 frozen projections; the JSON adds
lora_vs_attn and lora_int8_vs_attn (seconds per step, LoRA / attention-only). `--peft-only` runs
just those three.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench_common import machine, print_summary  # noqa: E402

from paligemma_seg.model import (  # noqa: E402
    GemmaConfig,
    LoraSettings,
    PaliGemma,
    PaliGemmaConfig,
    SiglipConfig,
    init_params,
    logical_axes,
    lora,
    param_shapes,
    quant,
)
from paligemma_seg.model.projections import PROJECTIONS  # noqa: E402
from paligemma_seg.train import optim  # noqa: E402
from paligemma_seg.train.step import TrainState, make_train_step  # noqa: E402

BATCH, TEXT, SUFFIX, VOCAB = 8, 64, 48, 2304
VISION = dict(width=256, depth=4, mlp_dim=1024, num_heads=4, patch_size=14, image_size=112)
LLM = dict(
    width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64, vocab_size=VOCAB
)
LR, CLIP = 1e-4, 1.0


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """16 prefix tokens (full attention) + 48 supervised suffix tokens per example."""
    rng = np.random.default_rng(seed)
    prefix = TEXT - SUFFIX
    mask_ar = np.array([[0] * prefix + [1] * SUFFIX] * BATCH, np.int32)
    side = VISION["image_size"]
    return {
        "image": rng.uniform(-1, 1, (BATCH, side, side, 3)).astype(np.float32),
        "text": rng.integers(3, VOCAB, (BATCH, TEXT)).astype(np.int32),
        "mask_ar": mask_ar,
        "mask_input": np.ones((BATCH, TEXT), np.int32),
        "mask_loss": mask_ar.copy(),
    }


def time_steps(step: Callable[[], object], steps: int, repeats: int) -> float:
    """Best seconds per step over `repeats` timed runs of `steps` steps (after one warm-up step)."""
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _peft_params(config: PaliGemmaConfig, params: dict, recipe: str) -> tuple[dict, dict]:
    """(params, trainable mask) of a recipe: 'all', 'attn', 'lora' or 'lora_int8'."""
    if recipe.startswith("lora"):
        shapes, axes = optim.with_adapters(
            param_shapes(config), logical_axes(config), LoraSettings(rank=16, alpha=16.0)
        )
        flat = optim.flatten(shapes["lora"])
        adapters = lora.init_adapters(flat, jax.random.PRNGKey(1))
        params = {**params, "lora": optim.unflatten(adapters)}
    mask = optim.trainable_mask(params, {"all": "all", "attn": "attn"}.get(recipe, "none"))
    if recipe == "all":
        return params, mask
    params = optim.cast_frozen(params, mask, "bfloat16")
    if recipe == "lora_int8":
        flat, flat_mask = optim.flatten(params), optim.flatten(mask)
        params = optim.unflatten(
            {k: quant.quantize(v.astype(jnp.float32), PROJECTIONS[k])
             if quant.quantizable(k, frozen=not flat_mask[k]) else v for k, v in flat.items()}
        )  # fmt: skip
    return params, mask


def ours(dtype: str, recipe: str = "all") -> tuple[Callable[[], None], float]:
    """(one step of our jitted, donated train step, XLA-counted FLOPs per step)."""
    # Layers unrolled: XLA's cost analysis counts a scanned (while-loop) body once, and for 4
    # layers unrolling is also the faster program on CPU.
    config = PaliGemmaConfig(
        vision=SiglipConfig(**VISION), llm=GemmaConfig(**LLM), dtype=dtype, param_dtype="float32",
        scan_layers=False,
    )  # fmt: skip
    params, mask = _peft_params(config, init_params(config, jax.random.PRNGKey(0)), recipe)
    cfg = optim.OptimConfig(
        name="adamw", lr=LR, momentum=0.9, clip_norm=CLIP, schedule="constant", trainable="all"
    )
    tx, schedule = optim.make_optimizer(cfg, total_steps=1000)
    step_fn = jax.jit(make_train_step(PaliGemma(config), tx, schedule, mask), donate_argnums=(0,))
    opt_state = tx.init(optim.split_params(params, mask)[0])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    rng = jax.random.PRNGKey(0)
    compiled = step_fn.lower(state, batch, rng).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    holder = {"state": state}

    def one() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready(metrics["loss"])

    return one, flops


def hf_model() -> transformers.PaliGemmaForConditionalGeneration:
    """transformers' PaliGemma of the same sizes (image placeholder id VOCAB, outside the text)."""
    text = dict(
        model_type="gemma", vocab_size=VOCAB, hidden_size=LLM["width"],
        intermediate_size=LLM["mlp_dim"],
        num_hidden_layers=LLM["depth"], num_attention_heads=LLM["num_heads"],
        num_key_value_heads=LLM["num_kv_heads"], head_dim=LLM["head_dim"],
        hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip
    vision = dict(
        model_type="siglip_vision_model", hidden_size=VISION["width"],
        intermediate_size=VISION["mlp_dim"],
        num_hidden_layers=VISION["depth"], num_attention_heads=VISION["num_heads"],
        patch_size=VISION["patch_size"], image_size=VISION["image_size"], vision_use_head=False,
    )  # fmt: skip
    config = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB, vocab_size=VOCAB,
        projection_dim=LLM["width"], hidden_size=LLM["width"],
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(config).train()


def torch_step(compile_model: bool, autocast: bool = False) -> Callable[[], None]:
    """One forward/backward/AdamW step of transformers' model on the same batch: float32, or
    float32 weights with bf16 compute under `torch.autocast` (the loss in float32)."""
    model = hf_model()
    batch = make_batch()
    image_tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
    ids = np.concatenate([np.full((BATCH, image_tokens), VOCAB), batch["text"]], 1)
    token_type = np.concatenate([np.zeros((BATCH, image_tokens)), batch["mask_ar"]], 1)
    inputs = dict(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        token_type_ids=torch.from_numpy(token_type).long(),
        pixel_values=torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()),
    )
    targets = torch.from_numpy(batch["text"][:, 1:]).long()
    weights = torch.from_numpy(batch["mask_loss"][:, 1:]).float()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)

    def loss_fn() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**inputs, logits_to_keep=TEXT).logits[:, :-1]
        logits = logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none"
        )
        return (per_token * weights).sum() / weights.sum()

    if compile_model:
        # transformers checks the image-token count with Tensor.item(): capture it in the graph.
        torch._dynamo.config.capture_scalar_outputs = True
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    forward = torch.compile(loss_fn) if compile_model else loss_fn

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()

    return one


def matmul_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a 2048^3 matmul in fp32 and bf16, JAX (XLA) and torch."""
    n, out = 2048, {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        seconds = time_steps(lambda f=f, a=a: f(a).block_until_ready(), 3, repeats)
        out[f"jax_{name}"] = 2 * n**3 / seconds / 1e9
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.ones((n, n), dtype=dtype)
        seconds = time_steps(lambda a=a: a @ a, 3, repeats)
        out[f"torch_{name}"] = 2 * n**3 / seconds / 1e9
    return out


VARIANTS = (
    "peaks", "torch_eager", "ours_fp32", "ours_bf16", "torch_eager_bf16", "torch_compile",
    "torch_compile_bf16",
)  # fmt: skip
TORCH_COMPILED = ("torch_compile", "torch_compile_bf16")
PEFT_VARIANTS = ("ours_attn_bf16", "ours_lora_bf16", "ours_lora_int8_bf16")


def measure(variant: str, steps: int, repeats: int) -> dict[str, object]:
    """Seconds per step (and FLOPs, peaks) of one variant, in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    if variant == "peaks":
        return matmul_peak(repeats)
    if variant in PEFT_VARIANTS:
        step, flops = ours("bfloat16", variant.removeprefix("ours_").removesuffix("_bf16"))
        return {"seconds": time_steps(step, steps, repeats), "flops": flops}
    if variant.startswith("ours"):
        step, flops = ours("float32" if variant == "ours_fp32" else "bfloat16")
        return {"seconds": time_steps(step, steps, repeats), "flops": flops}
    step = torch_step(variant in TORCH_COMPILED, autocast=variant.endswith("_bf16"))
    return {"seconds": time_steps(step, steps, repeats)}


def run_isolated(variant: str, args: argparse.Namespace) -> dict[str, object] | None:
    """`measure` in a fresh process: JAX, eager torch and inductor slowed each other down (up to
    10x) when they ran one after another in one process on these 2 cores."""
    command = [sys.executable, __file__, f"--variant={variant}", f"--steps={args.steps}"]
    command.append(f"--repeats={args.repeats}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        print(f"{variant} did not run: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> dict[str, object]:
    """Prints one line per variant and returns the summary JSON."""
    peaks, flops = results["peaks"], results["ours_fp32"]["flops"]
    peak = {
        "fp32": max(peaks["jax_fp32"], peaks["torch_fp32"]),
        "bf16": max(peaks["jax_bf16"], peaks["torch_bf16"]),
    }
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    print(f"step: {flops / 1e9:.1f} GFLOPs (XLA cost analysis of our fp32 step)")
    seconds = {k: v["seconds"] for k, v in results.items() if k != "peaks" and v is not None}
    for name, per_step in seconds.items():
        rate = flops / per_step / 1e9
        fraction = rate / peak["bf16" if name.endswith("bf16") else "fp32"]
        print(
            f"{name:<14} {BATCH / per_step:7.2f} ex/s  {per_step * 1e3:8.1f} ms/step  "
            f"{rate:6.1f} GFLOP/s = {fraction:5.1%} of the measured matmul peak"
        )
    best = lambda *names: min(seconds.get(n, float("inf")) for n in names)
    torch_best = best("torch_eager", "torch_compile")
    torch_bf16 = best("torch_eager_bf16", "torch_compile_bf16")
    rate = lambda name: BATCH / seconds[name] if name in seconds else None
    return {
        "ours_ex_per_s": BATCH / seconds["ours_fp32"],
        "ours_bf16_ex_per_s": BATCH / seconds["ours_bf16"],
        "torch_ex_per_s": BATCH / torch_best,
        "torch_bf16_ex_per_s": BATCH / torch_bf16,
        **{f"{name}_ex_per_s": rate(name) for name in VARIANTS if name.startswith("torch")},
        "speedup": torch_best / seconds["ours_fp32"],
        "speedup_bf16": torch_bf16 / seconds["ours_bf16"],
        "speedup_bf16_vs_torch_fp32": torch_best / seconds["ours_bf16"],
        "step_gflops": flops / 1e9,
        "peak_gflops": peaks,
    }


def peft_report(results: dict[str, dict | None]) -> dict[str, object]:
    """Prints the attention-only and LoRA steps; their time ratios (LoRA / attention-only)."""
    seconds = {k: v["seconds"] for k, v in results.items() if v is not None}
    for name, per_step in seconds.items():
        print(f"{name:<20} {BATCH / per_step:7.2f} ex/s  {per_step * 1e3:8.1f} ms/step")
    attn = seconds.get("ours_attn_bf16")
    ratio = lambda name: None if attn is None or name not in seconds else seconds[name] / attn
    return {
        "attn_ms_per_step": None if attn is None else attn * 1e3,
        "lora_vs_attn": ratio("ours_lora_bf16"),
        "lora_int8_vs_attn": ratio("ours_lora_int8_bf16"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--peft-only", action="store_true", help="only the attn/LoRA steps")
    parser.add_argument(
        "--variant", choices=VARIANTS + PEFT_VARIANTS, help="internal: measure one variant here"
    )
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.repeats)))
        return
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    peft = {v: run_isolated(v, args) for v in PEFT_VARIANTS}
    summary = peft_report(peft)
    if args.peft_only:
        print_summary(summary)
        return
    results = {}
    for variant in VARIANTS:
        if variant in TORCH_COMPILED and args.no_compile:
            continue
        results[variant] = run_isolated(variant, args)
    missing = [v for v in VARIANTS[:5] if results[v] is None]
    if missing:
        raise SystemExit(f"could not measure {missing}; see the messages above.")
    print_summary({**report(results), **summary})


if __name__ == "__main__":
    main()
