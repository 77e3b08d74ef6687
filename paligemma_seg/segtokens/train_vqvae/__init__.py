r"""Trains a vae-oid-shaped mask VQ-VAE on generated shapes plus real masks; writes vae-oid format.

    python -m paligemma_seg.segtokens.train_vqvae --masks ../shared/data/water_bodies/masks \
        --list ../shared/data/water_bodies/train_images.txt \
        --out checkpoints/vqvae_small.npz --steps 4400 --lr 8e-4

Straight-through VQ with a commitment loss and an EMA codebook, dead-code restarts from encoder
outputs, sigmoid cross-entropy on the decoder's raw output (> 0 = inside), plus `--iou-weight` times
a soft-IoU loss per crop. `--shape-mix thin_water` adds branching rivers, dendritic reservoirs,
rough coasts and specks to the generated shapes; `--init FILE.npz` fine-tunes an existing codec
(e.g. `--init checkpoints/vqvae_small.npz --steps 600 --lr 3e-4 --shape-mix thin_water
--iou-weight 1`). Crops come from
`codec.to_objects` (the codec's own boxes and resize) plus random windows of the real masks. A
slice of the real masks (by name hash) is held out for the final report (`OUT.json`). Resumable:
the full state goes to `OUT.state.npz` every --checkpoint-every steps, and a rerun continues it.
Training crops are `crops.py`; the command line is `__main__.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from paligemma_seg.segtokens import shapes, vqvae
from paligemma_seg.segtokens.train_vqvae.crops import (
    generated_crops,
    is_holdout,
    list_masks,
    read_mask,
    real_crops,
    sample_batch,
    to_uint8,
)

__all__ = ["TrainConfig", "list_masks", "read_mask", "sample_batch", "train"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 5e-4  # Adam peak, cosine decay to 10% after a short warm-up
    warmup_steps: int = 100
    commitment: float = 0.25  # weight of |z - sg(e)|^2
    ema_decay: float = 0.99  # codebook EMA
    restart_every: int = 100  # steps between dead-code restarts (codes unused in that window)
    real_fraction: float = 0.5  # share of each batch drawn from real-mask crops
    generated: int = 12000  # generated training crops
    windows_per_mask: int = 24  # random windows per real mask (on top of the codec's own crops)
    holdout_fraction: float = 0.1  # real masks held out (by name hash) for the report
    seed: int = 0
    iou_weight: float = 0.0  # weight of 1 - soft IoU per crop (thin parts count as much as blobs)
    shape_mix: str = "plain"  # generated kinds: "plain" (shapes.WEIGHTS) or "thin_water"
    init: str = ""  # start from this vae-oid-format .npz (fine-tuning); "" = random init


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    step: jax.Array
    params: dict  # all vqvae params except the codebook
    opt_state: optax.OptState
    codebook: jax.Array  # float32[128, 512]
    ema_count: jax.Array  # float32[128]
    ema_sum: jax.Array  # float32[128, 512]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        max(cfg.steps, cfg.warmup_steps + 1),
        cfg.learning_rate * 0.1,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


SHAPE_MIXES = {"plain": shapes.WEIGHTS, "thin_water": shapes.THIN_WATER_WEIGHTS}


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation) -> State:
    if cfg.init:
        params = {k: jnp.asarray(v, jnp.float32) for k, v in vqvae.load(cfg.init).params.items()}
    else:
        params = vqvae.init_params(jax.random.PRNGKey(cfg.seed))
    codebook = params.pop("codebook")
    return State(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        codebook,
        jnp.ones((vqvae.NUM_CODES,), jnp.float32),
        jnp.array(codebook, copy=True),  # a separate buffer: the step donates the state
    )


def reconstruction_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-crop IoU of (logits > 0) vs (targets > 0.5), float32[B]; empty vs empty = 1."""
    prediction, target = logits > 0, targets > 0.5
    inter = jnp.sum(prediction & target, axis=(1, 2, 3))
    union = jnp.sum(prediction | target, axis=(1, 2, 3))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def soft_iou_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over crops of 1 - soft IoU(sigmoid(logits), targets); +1 smoothing keeps empty crops
    finite (an empty crop predicted empty scores 1)."""
    probabilities = jax.nn.sigmoid(logits)
    inter = jnp.sum(probabilities * targets, axis=(1, 2, 3))
    union = jnp.sum(probabilities + targets, axis=(1, 2, 3)) - inter
    return jnp.mean(1.0 - (inter + 1.0) / (union + 1.0))


def make_train_step(cfg: TrainConfig, tx: optax.GradientTransformation):
    """Returns train_step(state, masks float32[B, 64, 64, 1]) -> (state, metrics)."""

    def loss_fn(params, codebook, masks):
        features = vqvae.encoder(params, masks)  # [B, 4, 4, 512]
        codes = vqvae.nearest_codes(features, codebook)  # [B, 4, 4]
        quantized = codebook[codes]
        straight_through = features + jax.lax.stop_gradient(quantized - features)
        logits = vqvae.decoder(params, straight_through)
        reconstruction = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks))
        if cfg.iou_weight:
            reconstruction = reconstruction + cfg.iou_weight * soft_iou_loss(logits, masks)
        commitment = jnp.mean((features - jax.lax.stop_gradient(quantized)) ** 2)
        loss = reconstruction + cfg.commitment * commitment
        return loss, (features, codes, logits, reconstruction, commitment)

    def train_step(state: State, masks: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (features, codes, logits, recon, commit)), grads = grad_fn(
            state.params, state.codebook, masks
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        one_hot = jax.nn.one_hot(
            codes.reshape(-1), vqvae.NUM_CODES, dtype=jnp.float32
        )  # [B*16, 128]
        counts = one_hot.sum(0)
        decay = cfg.ema_decay
        ema_count = decay * state.ema_count + (1 - decay) * counts
        ema_sum = decay * state.ema_sum + (1 - decay) * one_hot.T @ features.reshape(
            -1, vqvae.CODE_DIM
        )
        total = ema_count.sum()
        smoothed = (
            (ema_count + 1e-5) / (total + vqvae.NUM_CODES * 1e-5) * total
        )  # Laplace smoothing
        codebook = ema_sum / smoothed[:, None]
        metrics = {
            "loss": loss,
            "recon": recon,
            "commit": commit,
            "iou": reconstruction_iou(logits, masks).mean(),
            "grad_norm": optax.global_norm(grads),
            "counts": counts,
        }
        new_state = State(state.step + 1, params, opt_state, codebook, ema_count, ema_sum)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def restart_dead_codes(
    state: State, dead: np.ndarray, params: dict, masks: np.ndarray, rng: np.random.Generator
) -> State:
    """Moves each dead code onto a random encoder output of `masks` (plus a little noise)."""
    features = np.asarray(vqvae.encoder(params, masks)).reshape(-1, vqvae.CODE_DIM)
    picked = features[rng.choice(len(features), size=len(dead), replace=len(dead) > len(features))]
    picked = picked + rng.normal(0, 1e-3, picked.shape).astype(np.float32) * np.abs(picked).mean()
    count = np.asarray(state.ema_count).copy()
    ema_sum = np.asarray(state.ema_sum).copy()
    codebook = np.asarray(state.codebook).copy()
    mean_count = max(float(count.mean()), 1e-3)
    count[dead], ema_sum[dead], codebook[dead] = mean_count, picked * mean_count, picked
    return dataclasses.replace(
        state,
        codebook=jnp.asarray(codebook),
        ema_count=jnp.asarray(count),
        ema_sum=jnp.asarray(ema_sum),
    )


def full_params(state: State) -> vqvae.Params:
    return {**state.params, "codebook": state.codebook}


def evaluate(model: vqvae.VQVAE, crops: np.ndarray) -> float:
    """Mean per-crop IoU of decode(encode(crop)) > 0 vs crop > 0.5."""
    if len(crops) == 0:
        return float("nan")
    masks = crops[..., None].astype(np.float32)
    logits = model.decode(model.encode(masks))
    return float(reconstruction_iou(jnp.asarray(logits), jnp.asarray(masks)).mean())


# ---------- state I/O


def save_state(state: State, path: str) -> None:
    leaves = jax.tree_util.tree_leaves(state)
    tmp = path + ".tmp.npz"
    np.savez(tmp, *[np.asarray(leaf) for leaf in leaves])
    os.replace(tmp, path)


def load_state(template: State, path: str) -> State:
    with np.load(path) as data:
        leaves = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    treedef = jax.tree_util.tree_structure(template)
    if treedef.num_leaves != len(leaves):
        raise RuntimeError(
            f"{path} holds {len(leaves)} arrays, expected {treedef.num_leaves}; delete it"
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def build_data(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, np.ndarray]:
    paths = list_masks(args.masks, args.list)
    train_paths = [p for p in paths if not is_holdout(p.name, cfg.holdout_fraction)]
    holdout_paths = [p for p in paths if is_holdout(p.name, cfg.holdout_fraction)]
    print(
        f"{len(paths)} real masks: {len(train_paths)} for training, {len(holdout_paths)} held out"
    )
    return {
        "real": to_uint8(real_crops(train_paths, cfg.windows_per_mask, cfg.seed)),
        "generated": to_uint8(generated_crops(cfg.generated, cfg.seed, SHAPE_MIXES[cfg.shape_mix])),
        "holdout_real": real_crops(holdout_paths, 4, cfg.seed + 1),
        "holdout_generated": generated_crops(512, cfg.seed + 12345),
        "holdout_thin_water": generated_crops(512, cfg.seed + 23456, shapes.THIN_WATER_WEIGHTS),
        "holdout_names": np.array([p.name for p in holdout_paths]),
    }


def train(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    start = time.time()
    data = build_data(args, cfg)
    print({k: v.shape for k, v in data.items()})
    tx = make_optimizer(cfg)
    state = init_state(cfg, tx)
    state_path = args.out + ".state.npz"
    previous: dict = {}  # the report of the interrupted run, to carry its time and history on
    if os.path.exists(state_path):
        state = load_state(state, state_path)
        print(f"resumed from {state_path} at step {int(state.step)}")
        if os.path.exists(_report_path(args.out)):
            with open(_report_path(args.out)) as f:
                previous = json.load(f)
    train_step = make_train_step(cfg, tx)
    rng = np.random.default_rng(cfg.seed + int(state.step))
    pools = [data["real"], data["generated"]] if len(data["real"]) else [data["generated"]]
    weights = [cfg.real_fraction, 1 - cfg.real_fraction] if len(pools) == 2 else [1.0]
    window_counts = np.zeros(vqvae.NUM_CODES)
    history = []
    first_step = int(state.step)
    bar = tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps, desc="vqvae")
    for step in bar:
        masks = sample_batch(rng, pools, weights, cfg.batch_size)
        state, metrics = train_step(state, jnp.asarray(masks))
        window_counts += np.asarray(metrics["counts"])
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"loss is {float(metrics['loss'])} at step {step}; lower --lr")
        if (step + 1) % cfg.restart_every == 0:
            dead = np.flatnonzero(window_counts == 0)
            used = vqvae.NUM_CODES - len(dead)
            if len(dead) and step + 1 < cfg.steps * 0.9:
                state = restart_dead_codes(state, dead, state.params, masks, rng)
            history.append({"step": step + 1, "loss": float(metrics["loss"]), "used": used})
            window_counts[:] = 0
            bar.set_postfix(
                loss=f"{float(metrics['loss']):.4f}", iou=f"{float(metrics['iou']):.3f}", used=used
            )
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_state(state, state_path)
            vqvae.save(full_params(state), args.out)
        if args.max_minutes and time.time() - start > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached")
            save_state(state, state_path)
            vqvae.save(full_params(state), args.out)
            break
    bar.close()
    session = {"from_step": first_step, "to_step": int(state.step), "seconds": time.time() - start}
    return report(
        args,
        cfg,
        data,
        [*previous.get("sessions", []), session],
        [*previous.get("history", []), *history],
    )


def _report_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".json"


def report(args, cfg: TrainConfig, data: dict, sessions: list[dict], history: list) -> dict:
    """Evaluates the file written (float16, as shipped) and writes OUT.json."""
    model = vqvae.load(args.out)
    usage_crops = np.concatenate([data["holdout_real"], data["holdout_generated"]])[..., None]
    codes = model.encode(usage_crops)
    frequencies = np.bincount(codes.ravel(), minlength=vqvae.NUM_CODES) / codes.size
    nonzero = frequencies[frequencies > 0]
    result = {
        "steps": sessions[-1]["to_step"],
        "seconds": round(sum(s["seconds"] for s in sessions), 1),
        "sessions": [{**s, "seconds": round(s["seconds"], 1)} for s in sessions],
        "config": dataclasses.asdict(cfg),
        "masks": args.masks,
        "list": args.list,
        "train_crops": {"real": len(data["real"]), "generated": len(data["generated"])},
        "holdout_real_masks": data["holdout_names"].tolist(),
        "iou_holdout_real_crops": evaluate(model, data["holdout_real"]),
        "iou_holdout_generated_crops": evaluate(model, data["holdout_generated"]),
        "iou_holdout_thin_water_crops": evaluate(model, data["holdout_thin_water"]),
        "codes_used_on_holdout": int(len(nonzero)),
        "code_perplexity_on_holdout": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
        "history": history,
    }
    with open(_report_path(args.out), "w") as f:
        json.dump(result, f, indent=1)
    return result
