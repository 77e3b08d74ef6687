"""Defaults shared by every experiment: one `ConfigDict`, every key commented.

Experiments (`configs/water_*.py`) call `base.get_config()` and change a handful of keys. Any
key can be overridden on the command line, e.g. `python -m paligemma_seg.train --config
configs/water_224.py --config.optim.lr=0.01 --config.model.overrides.remat=True`. Relative paths
are relative to the directory the command runs in (the repository root in the README's commands).
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Base config: a PaliGemma 1 3B @224 recipe; experiments override what differs."""
    c = ml_collections.ConfigDict()

    # --- Run ---
    c.seed = 0  # Seeds init, data order and per-step RNG: same seed + config = same run.
    c.total_steps = 300  # Optimizer updates (one global batch each, accumulation included).
    c.batch_size = 8  # Global examples per update, over all hosts and devices.
    c.seq_len = 128  # Text tokens per example: BOS, prefix, "\n", suffix, EOS, padding.
    c.log_steps = 10  # Write metrics.jsonl (and check for NaN) every N steps.
    c.val_steps = 50  # Validation loss on data.val_split every N steps and at the end; 0 = off.
    c.val_max_examples = 0  # Examples of the validation split that val_steps scores; 0 = all.
    c.ckpt_steps = 100  # Checkpoint every N steps, at the end and on SIGTERM; 0 = end only.
    c.eval_steps = 0  # Decode + mIoU (infer.evaluation) every N steps and at end; 0=off
    # '' = random init; else a big_vision .npz, a Hugging Face directory or an orbax checkpoint.
    c.init = ""
    c.workdir = ""  # Checkpoints, metrics.jsonl, params.npz, eval output; --workdir wins.

    # --- Model (paligemma_seg.model.config) ---
    c.model = ml_collections.ConfigDict()
    c.model.preset = "pg1-3b-224"  # A name from paligemma_seg.model.config.PRESETS.
    # Gemma 2 only: 'big_vision' (no sliding window, no final soft-cap) or 'transformers'.
    c.model.compat = "big_vision"
    c.model.overrides = ml_collections.ConfigDict()  # PaliGemmaConfig fields to change.
    c.model.overrides.dtype = "bfloat16"  # Compute dtype: 'float32' or 'bfloat16'.
    c.model.overrides.param_dtype = "float32"  # Parameter storage: f32 master copies.
    c.model.overrides.remat = False  # Recompute each block in the backward pass (less memory).
    c.model.overrides.scan_layers = True  # lax.scan over blocks; False unrolls (faster step).
    # Random init only: sincos2d image position embeddings, <loc> rows smooth in the bin, <seg> rows
    # from the codec's codebook (paligemma_seg/model/scratch_init.py). For training from scratch.
    c.model.structured_init = False

    # --- Tokenizer ---
    c.tokenizer = "checkpoints/paligemma_tokenizer.model"  # SentencePiece with <loc>/<seg>.

    # --- Mask codec (paligemma_seg.segtokens): mask <-> <loc>x4 <seg>x16 label per object ---
    c.codec = ml_collections.ConfigDict()
    c.codec.vqvae = "checkpoints/vae-oid.npz"  # VQ-VAE; real PaliGemma weights need vae-oid.npz.
    c.codec.threshold = 127  # Grey level (0-255) above which a mask pixel is water.
    c.codec.open_radius = 0  # Clean-up: binary opening, disk radius in px (0 = off).
    c.codec.close_radius = 0  # Clean-up: binary closing, disk radius in px (0 = off).
    c.codec.min_area = 0.0  # Clean-up: drop parts smaller than this fraction of the image.
    c.codec.max_objects = 8  # At most this many objects (largest first) per mask.
    c.codec.whole_mask = False  # True = one box around all water instead of one per part.
    c.codec.crop_others = True  # An object's crop holds all water in its box, not only its part.
    c.codec.connectivity = 8  # 4 or 8: which neighbours join pixels into one part.
    c.codec.loc_rounding = "ceil"  # Box edge -> <loc>: 'ceil' (exact round trip) or 'round'.
    c.codec.label = "water"  # Text after each object's 20 tokens.
    c.codec.refine_steps = 0  # Sweeps of decoder-optimal code search (VQVAE.refine); 0 = off.
    c.codec.refine_candidates = 16  # Codes tried per position and sweep (nearest first; 128 = all).

    # --- Data (paligemma_seg.data): images + masks -> JSONL (convert CLI) -> tf.data ---
    c.data = ml_collections.ConfigDict()
    c.data.images = "../shared/data/water_bodies/images"  # Image folder (convert CLI input).
    c.data.masks = "../shared/data/water_bodies/masks"  # Masks, same names as the images.
    c.data.splits = ml_collections.ConfigDict()  # Split name -> text file listing image names.
    c.data.splits.train = "../shared/data/water_bodies/train_images.txt"  # 164 images.
    c.data.splits.test = "../shared/data/water_bodies/test_images.txt"  # 21 images.
    c.data.jsonl_dir = "data/water_jsonl_vaeoid"  # NAME.jsonl per split; converted if missing.
    c.data.prefix = "segment water"  # Prompt of every example (binary masks).
    # Class-id masks: '1=water,2=building' or a classes.json file ('' = binary masks). Lines then
    # ask for every class ('segment water ; building') and answer with labelled objects.
    c.data.classes = ""
    # COCO instance JSON instead of data.masks: split name -> annotation file (data.splits unused).
    c.data.coco = ml_collections.ConfigDict()  # e.g. {'train': 'train.json', 'test': 'test.json'}
    # How multi-class lines are asked (paligemma_seg/data/tasks.py): 'joint' (all classes in one
    # prompt) or 'per_class' (one example per class present, plus absent-class negatives).
    c.data.prompts = "joint"
    c.data.negative_rate = 0.5  # per_class: chance that an absent class is asked (answer: empty).
    c.data.tasks = "segment"  # 'segment', 'detect' or 'segment,detect' (boxes from the same data).
    # More JSONL files trained alongside the train split: a list of {'jsonl': PATH, 'weight': W};
    # the train split has weight data.train_weight. Other tools' lines (captions, VQA, detect,
    # segment) are welcome: their <loc>/<seg> syntax is checked, bad lines named by file:line.
    c.data.mixture = []  # [{'jsonl': PATH, 'weight': W}, ...]; [] = the train split alone.
    c.data.train_weight = 1.0  # The train split's weight in data.mixture.
    # True: leave bad JSONL lines out (each logged) instead of failing.
    c.data.skip_bad_lines = False
    c.data.train_split = "train"  # Split trained on.
    c.data.val_split = "test"  # Split of the validation loss (the water set has no val split).
    c.data.test_split = "test"  # Split of the final evaluation.
    # > 0: each epoch is a seeded permutation of all examples (indices only, so any value > 0
    # shuffles fully); 0 = file order.
    c.data.shuffle_buffer = 50_000
    # > 0: the automatic convert also writes every image resized to this many px (resized_PX/ in
    # data.jsonl_dir); runs at that model resolution read those instead of decoding full-size
    # images every step (convert --resize). 0 = off.
    c.data.resize = 0
    c.data.num_parallel_calls = 4  # tf.data threads that decode and resize images.
    c.data.prefetch = 2  # Batches prepared ahead of the train step.
    c.data.synthetic = ml_collections.ConfigDict()  # Generated tiles (data/synthetic/).
    c.data.synthetic.num_images = 0  # > 0: generate into data.images' parent if it is missing.
    c.data.synthetic.size = 128  # Side of the generated tiles in pixels.
    c.data.synthetic.seed = 0  # Seed of the generator.
    # 'water', or 'water,building' (class-id masks: 1 = water, 2 = building; set data.classes).
    c.data.synthetic.classes = "water"

    # --- Optimizer (paligemma_seg.train.optim) ---
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # 'sgd' (optional momentum), 'adamw' or 'adafactor'.
    c.optim.lr = 0.003  # Peak learning rate.
    c.optim.schedule = "cosine"  # After warmup: 'cosine' (to 0), 'linear' (to 0) or 'constant'.
    c.optim.warmup_steps = 30  # Linear warmup over this many updates.
    c.optim.momentum = 0.0  # SGD's and adafactor's momentum (0 = none, no state); not adamw's.
    c.optim.b1 = 0.9  # adamw's first-moment (momentum) decay, as optax and big_vision default.
    c.optim.b2 = 0.999  # adamw's second-moment decay.
    c.optim.weight_decay = 0.0  # Decoupled decay of weight matrices (not norms/biases), x lr.
    c.optim.clip_norm = 1.0  # Clip gradients to this global L2 norm; 0 = off.
    c.optim.grad_accum = 1  # Micro-batches per update (same update, less activation memory).
    # Which parameters train: 'attn' (llm/layers/attn), 'llm', 'img', 'all', 'none' (LoRA only), or
    # a regex searched in paths like 'llm/layers/mlp/linear'. The others are frozen: no gradient,
    # no optimizer state.
    c.optim.trainable = "attn"
    # Storage of frozen parameters; '' = as loaded/initialised; 'int8' = frozen projection matrices
    # int8 with one scale per output channel (dequantised per layer in the matmul), the rest bf16.
    c.optim.frozen_dtype = "bfloat16"
    # LoRA (paligemma_seg/model/lora.py): adapters in their own subtree params['lora'], trained
    # with their optimizer state; the base tree only where optim.trainable says (use 'none').
    c.optim.lora = ml_collections.ConfigDict()
    c.optim.lora.rank = 0  # r of each adapter; 0 = no LoRA.
    c.optim.lora.alpha = 16.0  # The low-rank term is scaled by alpha / rank (PEFT's lora_alpha).
    c.optim.lora.dropout = 0.0  # Dropout on each adapted matmul's input, training only; [0, 1).
    # Regex searched in projection paths (e.g. 'llm/layers/attn/q_einsum/w'); default: the LLM's
    # attention and MLP projections (PEFT's q/k/v/o/gate/up/down_proj).
    c.optim.lora.targets = (
        r"^llm/layers/(attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w|mlp/)"
    )

    # --- Training loss (paligemma_seg.train.loss); validation loss is always plain CE and a
    # per-token mean, whatever the keys below say ---
    c.loss = ml_collections.ConfigDict()
    # How a batch's loss is averaged: 'token' = sum over all supervised tokens of the global batch
    # / their number (long answers weigh more); 'example' = big_vision's: the mean over each
    # example's supervised tokens, then the mean over the batch's examples (each counts the same).
    c.loss.normalize = "token"
    c.loss.loc_sigma = 0.0  # > 0: Gaussian soft targets over <loc> bins, this wide (in bins).
    c.loss.seg_temperature = 0.0  # > 0: soft <seg> targets by codebook distance (see module).
    # > 1: the loss takes its logits this many vocabulary slices at a time (a streaming
    # logsumexp) and never holds float32[B, T, V]: ~2 GiB less at 257k tokens, batch 8 x 128.
    # For a frozen embedding (LoRA, attention-only); with a trained one it costs memory and time
    # (scripts/bench_vocab_chunks.py --train-table).
    c.loss.vocab_chunks = 1

    # --- Device mesh (paligemma_seg.sharding) ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # Devices that hold a full copy of the parameters (pure data parallelism).
    c.mesh.fsdp = -1  # Devices that split parameters and optimizer state; -1 = all the rest.
    c.mesh.strategy = "fsdp"  # Partition rules: 'fsdp' (split params over fsdp) or 'replicated'.

    # --- Checkpoints (paligemma_seg.train.checkpoint) ---
    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.keep = 2  # Keep the last K checkpoints.
    c.ckpt.async_save = True  # Write checkpoints in the background while training continues.
    c.ckpt.export_npz = True  # At the end also write the weights to WORKDIR/params.npz.
    # Also keep the best checkpoint (WORKDIR/checkpoints_best, WORKDIR/params_best.npz) by
    # 'val_loss' (lowest, every val_steps) or 'miou' (highest eval mIoU, every eval_steps); ''=off.
    c.ckpt.keep_best = ""
    c.ckpt.early_stop_patience = 0  # Stop after N evaluations of keep_best's metric, no new best.

    # --- Evaluation (paligemma_seg.infer.evaluation) ---
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"  # Split decoded and scored.
    c.eval.max_examples = 0  # 0 = all examples of the split.
    c.eval.batch_size = 8  # Examples decoded together.
    c.eval.contact_sheet_rows = 8  # Rows of image | truth | prediction in the contact sheet.

    # --- Decoding (paligemma_seg.infer.decode) ---
    c.decode = ml_collections.ConfigDict()
    c.decode.max_new_tokens = 0  # Tokens generated after the prompt; 0 = seq_len - prompt.
    c.decode.constrained = True  # Only allow token sequences that the mask grammar accepts.
    c.decode.max_objects = 8  # Stop after this many objects.
    c.decode.temperature = 0.0  # 0 = greedy.
    c.decode.top_k = 0  # Sample among the k most likely tokens (temperature > 0); 0 = all.
    return c
