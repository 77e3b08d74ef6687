"""The mask VQ-VAE of big_vision's `vae-oid.npz` in pure JAX: encoder, codebook, decoder, npz I/O.

Owns the network (architecture of arXiv 2301.02229 as used by PaliGemma) and the npz format (a
flattened PyTorch state dict). It knows nothing of boxes, tokens or text; `codec.py` does that.

Layouts: the npz holds torch layouts (Conv2d [out, in, kh, kw], ConvTranspose2d [in, out, kh, kw]);
in memory every kernel is a plain convolution kernel in HWIO [kh, kw, in, out]. A torch transposed
convolution (kernel 4, stride 2, padding 1) equals a convolution of the 2x-dilated input with the
spatially flipped kernel and padding kernel - 1 - padding = 2; `_conv_transpose` computes that sum
phase by phase as one 2x2 convolution, without the inserted zeros (checked against torch in
tests/test_vqvae.py).
Parameters are float32; `save` writes float16 by default (4 MB), `load` reads f16/bf16/f32.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.segtokens.layout import MASK_SIZE, NUM_CODES, TOKENS_PER_MASK

CODE_DIM = 512
_BUCKETS = (1, 8, 32, 128)

Params = dict[str, jax.Array]

# torch key prefix -> (our parameter name, torch kernel shape, kind).
# kind: "conv" = nn.Conv2d [out, in, kh, kw]; "convT" = nn.ConvTranspose2d [in, out, kh, kw].
_LAYERS: tuple[tuple[str, str, tuple[int, int, int, int], str], ...] = (
    ("encoder.0", "enc_down0", (16, 1, 4, 4), "conv"),
    ("encoder.2", "enc_down1", (32, 16, 4, 4), "conv"),
    ("encoder.4", "enc_down2", (64, 32, 4, 4), "conv"),
    ("encoder.6", "enc_down3", (128, 64, 4, 4), "conv"),
    *(
        (f"encoder.{8 + b}.net.{2 * i}", f"enc_res{b}_{i}", shape, "conv")
        for b in range(2)
        for i, shape in enumerate(((128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 1, 1)))
    ),
    ("encoder.10", "enc_proj", (CODE_DIM, 128, 1, 1), "conv"),
    ("decoder.0", "dec_proj", (128, CODE_DIM, 1, 1), "conv"),
    *(
        (f"decoder.{2 + b}.net.{2 * i}", f"dec_res{b}_{i}", shape, "conv")
        for b in range(2)
        for i, shape in enumerate(((128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 1, 1)))
    ),
    ("decoder.4", "dec_up0", (128, 128, 4, 4), "convT"),
    ("decoder.6", "dec_up1", (128, 64, 4, 4), "convT"),
    ("decoder.8", "dec_up2", (64, 32, 4, 4), "convT"),
    ("decoder.10", "dec_up3", (32, 16, 4, 4), "convT"),
    ("decoder.12", "dec_out", (1, 16, 1, 1), "conv"),
)
CODEBOOK_KEY = "_vq_vae._embedding"


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every npz key the VQ-VAE reads, with its torch-layout shape."""
    shapes: dict[str, tuple[int, ...]] = {CODEBOOK_KEY: (NUM_CODES, CODE_DIM)}
    for key, _, shape, kind in _LAYERS:
        shapes[f"{key}.weight"] = shape
        shapes[f"{key}.bias"] = (shape[1] if kind == "convT" else shape[0],)
    return shapes


# ---------- layers


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1) -> jax.Array:
    """float[B, H, W, I] * HWIO kernel -> float[B, H/stride, W/stride, O].

    Padding as vae-oid's torch layers (= TF 'SAME' here): 1x1 -> 0; 3x3 -> 1; 4x4 stride 2 -> 1.
    """
    pad = 0 if kernel.shape[0] == 1 else 1
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


# A stride-2 transposed convolution splits into 4 output phases (row parity ry, column parity rx).
# Output row 2m + ry reads two input rows with two rows of the flipped kernel: ry = 0: rows m - 1
# and m with kernel rows 0 and 2; ry = 1: rows m and m + 1 with kernel rows 1 and 3 (same for
# columns). So each phase is a 2x2 convolution of the input padded by 1, phase ry's output m
# sitting at window m + ry: one 2x2 convolution with 4 * O outputs computes all four.
_PHASE_ROWS = np.array([[0, 2], [1, 3]])  # [phase, tap] -> row (column) of the flipped kernel


def _phase_kernel(kernel: jax.Array) -> jax.Array:
    """Flipped 4x4 kernel float[4, 4, I, O] -> float[2, 2, I, 4 * O] (taps, then the 4 phases)."""
    rows = _PHASE_ROWS
    # [ry, ty, rx, tx, I, O]
    phased = kernel[rows[:, :, None, None], rows[None, None, :, :]]
    return phased.transpose(1, 3, 4, 0, 2, 5).reshape(2, 2, kernel.shape[2], -1)


def _conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """torch ConvTranspose2d(4, stride 2, padding 1): float[B, H, W, I] -> float[B, 2H, 2W, O].

    `kernel` float[4, 4, I, O] is the equivalent plain-convolution kernel (torch's [I, O, kh, kw]
    moved to HWIO and flipped in space), i.e. what would run over the input dilated by 2 with
    padding 2. One 2x2 convolution of the undilated input computes the 4 output phases: the same
    sums without the inserted zeros and without zero taps (on CPU twice as fast as a 3x3 kernel
    holding all phases, which was 2.5x faster than the dilated form).
    """
    batch, height, width, _ = x.shape
    # [B, H + 1, W + 1, 2, 2, O]: window (q, r), phase (ry, rx) is output pixel (q - ry, r - rx).
    y = jax.lax.conv_general_dilated(
        x,
        _phase_kernel(kernel),
        (1, 1),
        [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ).reshape(batch, height + 1, width + 1, 2, 2, -1)
    phase_rows = [
        jnp.stack([y[:, ry : ry + height, rx : rx + width, ry, rx] for rx in (0, 1)], axis=3)
        for ry in (0, 1)
    ]  # each [B, H, W, 2 (rx), O]
    y = jnp.stack(phase_rows, axis=2)  # [B, H, 2 (ry), W, 2 (rx), O]
    return y.reshape(batch, 2 * height, 2 * width, -1) + bias


def _resblock(params: Params, prefix: str, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(_conv(x, params[f"{prefix}_0/kernel"], params[f"{prefix}_0/bias"]))
    h = jax.nn.relu(_conv(h, params[f"{prefix}_1/kernel"], params[f"{prefix}_1/bias"]))
    return x + _conv(h, params[f"{prefix}_2/kernel"], params[f"{prefix}_2/bias"])


def encoder(params: Params, masks: jax.Array) -> jax.Array:
    """masks float[B, 64, 64, 1] in [0, 1] -> pre-quantisation features float32[B, 4, 4, 512]."""
    x = 2.0 * (masks.astype(jnp.float32) - 0.5)
    for i in range(4):
        x = jax.nn.relu(
            _conv(x, params[f"enc_down{i}/kernel"], params[f"enc_down{i}/bias"], stride=2)
        )
    x = _resblock(params, "enc_res0", x)
    x = _resblock(params, "enc_res1", x)
    return _conv(x, params["enc_proj/kernel"], params["enc_proj/bias"])


def decoder(params: Params, features: jax.Array) -> jax.Array:
    """features float[B, 4, 4, 512] -> raw mask logits float32[B, 64, 64, 1] (> 0 inside)."""
    x = jax.nn.relu(_conv(features, params["dec_proj/kernel"], params["dec_proj/bias"]))
    x = _resblock(params, "dec_res0", x)
    x = _resblock(params, "dec_res1", x)
    for i in range(4):
        x = jax.nn.relu(_conv_transpose(x, params[f"dec_up{i}/kernel"], params[f"dec_up{i}/bias"]))
    return _conv(x, params["dec_out/kernel"], params["dec_out/bias"])


def nearest_codes(features: jax.Array, codebook: jax.Array) -> jax.Array:
    """features float[..., 512], codebook float[128, 512] -> int32[...] nearest (squared L2)."""
    distances = (
        jnp.sum(features**2, axis=-1, keepdims=True)
        - 2.0 * features @ codebook.T
        + jnp.sum(codebook**2, axis=-1)
    )
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def encode_codes(params: Params, masks: jax.Array) -> jax.Array:
    """masks float[B, 64, 64, 1] in [0, 1] -> int32[B, 16] codes, row-major over the 4x4 grid."""
    codes = nearest_codes(encoder(params, masks), params["codebook"])
    return codes.reshape(codes.shape[0], TOKENS_PER_MASK)


def decode_codes(params: Params, codes: jax.Array) -> jax.Array:
    """codes int32[B, 16] (clipped to 0..127) -> raw mask logits float32[B, 64, 64, 1]."""
    codes = jnp.clip(codes, 0, NUM_CODES - 1)
    features = jnp.take(params["codebook"], codes, axis=0).reshape(codes.shape[0], 4, 4, CODE_DIM)
    return decoder(params, features)


def crop_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """IoU of decoded crops (logits > 0) with true crops (> 0.5): float[..., 64, 64] -> [...].

    Two empty crops agree fully (1.0)."""
    predicted, truth = logits > 0, targets > 0.5
    inter = jnp.sum(predicted & truth, axis=(-2, -1))
    union = jnp.sum(predicted | truth, axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def refine_codes(
    params: Params, masks: jax.Array, codes: jax.Array, steps: int, candidates: int = NUM_CODES
) -> jax.Array:
    """Decoder-optimal codes: coordinate descent from `codes` on the decoded crop's IoU.

    masks float[B, 64, 64, 1] in [0, 1], codes int32[B, 16] (the encoder's nearest codes) ->
    int32[B, 16]. Each of `steps` sweeps visits the 16 positions in order; at a position, the
    current code and `candidates` others (all 128, or the ones nearest to the encoder's feature
    there) are decoded as one batch and the best IoU with the true crop wins (ties keep the
    current code, so the IoU never drops). The token format is unchanged: this only picks other
    targets, for any vae-oid-format VQ-VAE.
    """
    batch = codes.shape[0]
    targets = masks[..., 0]
    if candidates >= NUM_CODES:
        options = jnp.broadcast_to(
            jnp.arange(NUM_CODES, dtype=jnp.int32), (batch, TOKENS_PER_MASK, NUM_CODES)
        )
    else:
        features = encoder(params, masks).reshape(batch, TOKENS_PER_MASK, CODE_DIM)
        codebook = params["codebook"]
        distances = jnp.sum(codebook**2, axis=-1) - 2.0 * features @ codebook.T
        options = jnp.argsort(distances, axis=-1)[..., :candidates].astype(jnp.int32)
    width = options.shape[-1] + 1

    def visit(step: jax.Array, current: jax.Array) -> jax.Array:
        position = step % TOKENS_PER_MASK
        tried = jnp.concatenate([current[:, position, None], options[:, position]], axis=1)
        at_position = jnp.arange(TOKENS_PER_MASK) == position  # [16]
        trials = jnp.where(at_position, tried[..., None], current[:, None, :])  # [B, width, 16]
        logits = decode_codes(params, trials.reshape(batch * width, TOKENS_PER_MASK))
        scores = crop_iou(
            logits[..., 0].reshape(batch, width, MASK_SIZE, MASK_SIZE), targets[:, None]
        )
        best = jnp.take_along_axis(tried, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]
        return jnp.where(at_position, best[:, None], current)

    return jax.lax.fori_loop(0, steps * TOKENS_PER_MASK, visit, codes.astype(jnp.int32))


_encode_jit = jax.jit(encode_codes)
_decode_jit = jax.jit(decode_codes)
_refine_jit = jax.jit(refine_codes, static_argnames=("steps", "candidates"))
_REFINE_DECODES = 1024  # decoder rows per refinement call: masks per call = this // (candidates+1)


def init_params(rng: jax.Array) -> Params:
    """Random parameters: uniform kernels in +-1/sqrt(fan_in), zero biases, N(0, 0.1) codebook."""
    params: Params = {}
    keys = jax.random.split(rng, len(_LAYERS) + 1)
    for key, (_, name, shape, kind) in zip(keys[:-1], _LAYERS, strict=True):
        out_ch, in_ch = (shape[1], shape[0]) if kind == "convT" else (shape[0], shape[1])
        kh, kw = shape[2], shape[3]
        bound = 1.0 / np.sqrt(in_ch * kh * kw)
        params[f"{name}/kernel"] = jax.random.uniform(
            key, (kh, kw, in_ch, out_ch), jnp.float32, -bound, bound
        )
        params[f"{name}/bias"] = jnp.zeros((out_ch,), jnp.float32)
    params["codebook"] = jax.random.normal(keys[-1], (NUM_CODES, CODE_DIM), jnp.float32) * 0.1
    return params


# ---------- npz I/O


def _as_float32(array: np.ndarray) -> np.ndarray:
    """Reads float16/32/64 and bfloat16 (which numpy stores as 2-byte void, '|V2') as float32."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        import ml_dtypes

        array = array.view(ml_dtypes.bfloat16)
    return np.asarray(array, np.float32)


def params_from_torch(state: Mapping[str, np.ndarray], source: str = "checkpoint") -> Params:
    """A flat torch state dict with vae-oid's key names -> our params (HWIO). Extra keys are
    ignored.

    Raises ValueError naming each missing key or wrong shape with the shape expected.
    """
    state = {k.removeprefix("params/"): v for k, v in state.items()}
    problems = []
    for key, shape in expected_shapes().items():
        if key not in state:
            problems.append(f"missing key {key!r} (expected shape {shape})")
        elif tuple(state[key].shape) != shape:
            problems.append(f"key {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(
            f"{source} is not a vae-oid-compatible VQ-VAE: "
            + "; ".join(problems)
            + ". Use big_vision's vae-oid.npz or a file written by segtokens.vqvae.save."
        )
    params: Params = {"codebook": jnp.asarray(_as_float32(state[CODEBOOK_KEY]))}
    for key, name, _, kind in _LAYERS:
        weight = _as_float32(state[f"{key}.weight"])
        if kind == "convT":  # [I, O, kh, kw] -> [kh, kw, I, O], flipped in space.
            kernel = weight.transpose(2, 3, 0, 1)[::-1, ::-1]
        else:  # [O, I, kh, kw] -> [kh, kw, I, O].
            kernel = weight.transpose(2, 3, 1, 0)
        params[f"{name}/kernel"] = jnp.asarray(np.ascontiguousarray(kernel))
        params[f"{name}/bias"] = jnp.asarray(_as_float32(state[f"{key}.bias"]))
    return params


def params_to_torch(params: Params, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """Our params -> flat torch state dict, vae-oid names and layouts (inverse of the above)."""
    state = {CODEBOOK_KEY: np.asarray(params["codebook"], dtype)}
    for key, name, _, kind in _LAYERS:
        kernel = np.asarray(params[f"{name}/kernel"], np.float32)
        if kind == "convT":
            weight = kernel[::-1, ::-1].transpose(2, 3, 0, 1)
        else:
            weight = kernel.transpose(3, 2, 0, 1)
        state[f"{key}.weight"] = np.ascontiguousarray(weight).astype(dtype)
        state[f"{key}.bias"] = np.asarray(params[f"{name}/bias"], dtype)
    return state


def save(params: Params, path: str | os.PathLike, dtype: np.dtype = np.float16) -> None:
    """Writes params as a vae-oid-format npz (torch key names and layouts), atomically."""
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **params_to_torch(params, dtype))
    os.replace(tmp, path)


# ---------- public


def _bucket(n: int) -> int:
    return next((b for b in _BUCKETS if n <= b), _BUCKETS[-1])


@dataclasses.dataclass(frozen=True)
class VQVAE:
    """A loaded VQ-VAE. Methods take and return numpy arrays; batches are padded to a few fixed
    sizes (1, 8, 32, 128; larger batches run in chunks of 128) so jit compiles each shape once."""

    params: Params

    def encode(self, masks: np.ndarray) -> np.ndarray:
        """masks float[B, 64, 64, 1] in [0, 1] -> int32[B, 16] codes in 0..127 (row-major 4x4)."""
        masks = np.asarray(masks, np.float32)
        if masks.ndim != 4 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE, 1):
            raise ValueError(f"masks must be float[B, 64, 64, 1], got shape {masks.shape}")
        return self._batched(_encode_jit, masks, np.int32)

    def refine(
        self, masks: np.ndarray, codes: np.ndarray, steps: int, candidates: int = NUM_CODES
    ) -> np.ndarray:
        """`refine_codes` in fixed-size chunks: masks float[B, 64, 64, 1], codes int[B, 16] ->
        int32[B, 16] whose decoded crops agree with `masks` at least as well as `codes`'."""
        masks, codes = np.asarray(masks, np.float32), np.asarray(codes, np.int32)
        if steps <= 0 or len(codes) == 0:
            return codes
        candidates = int(min(max(candidates, 1), NUM_CODES))
        largest = max(1, _REFINE_DECODES // (candidates + 1))
        outputs = []
        for start in range(0, len(codes), largest):
            chunk_masks, chunk_codes = (
                masks[start : start + largest],
                codes[start : start + largest],
            )
            count = len(chunk_codes)  # padded to 1, 4, 16 or `largest` masks: few compilations
            size = next((b for b in (1, 4, 16) if count <= b <= largest), largest)
            padded_masks = np.zeros((size, *masks.shape[1:]), np.float32)
            padded_codes = np.zeros((size, TOKENS_PER_MASK), np.int32)
            padded_masks[:count], padded_codes[:count] = chunk_masks, chunk_codes
            refined = _refine_jit(
                self.params, padded_masks, padded_codes, steps=steps, candidates=candidates
            )
            outputs.append(np.asarray(refined)[:count])
        return np.concatenate(outputs).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes int[B, 16] in 0..127 -> raw logits float32[B, 64, 64, 1] (> 0 means inside)."""
        codes = np.asarray(codes, np.int32)
        if codes.ndim != 2 or codes.shape[1] != TOKENS_PER_MASK:
            raise ValueError(f"codes must be int[B, 16], got shape {codes.shape}")
        return self._batched(_decode_jit, codes, np.float32)

    def _batched(self, fn, inputs: np.ndarray, dtype: type) -> np.ndarray:
        outputs = []
        for start in range(0, len(inputs), _BUCKETS[-1]):
            chunk = inputs[start : start + _BUCKETS[-1]]
            size = _bucket(len(chunk))
            padded = np.zeros((size, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            outputs.append(np.asarray(fn(self.params, padded))[: len(chunk)])
        if not outputs:
            shape = (0, TOKENS_PER_MASK) if dtype == np.int32 else (0, MASK_SIZE, MASK_SIZE, 1)
            return np.zeros(shape, dtype)
        return np.concatenate(outputs).astype(dtype)


def load(path: str | os.PathLike) -> VQVAE:
    """Loads `vae-oid.npz` or a file written by `save` (keys it does not use are ignored)."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        state = {key: data[key] for key in data.files}
    return VQVAE(params_from_torch(state, source=os.fspath(path)))
