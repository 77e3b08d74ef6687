"""VQ-VAE: torch oracle (vae-oid key names and layouts), npz loading rules, save/load, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from paligemma_seg.segtokens import vqvae

# vae-oid.npz's keys and torch shapes, written out from big_vision's segmentation code (independent of the
# table in vqvae.py).
_RES = {".net.0": (128, 128, 3, 3), ".net.2": (128, 128, 3, 3), ".net.4": (128, 128, 1, 1)}
VAE_OID_WEIGHTS = {
    "encoder.0": (16, 1, 4, 4),
    "encoder.2": (32, 16, 4, 4),
    "encoder.4": (64, 32, 4, 4),
    "encoder.6": (128, 64, 4, 4),
    **{f"encoder.8{k}": v for k, v in _RES.items()},
    **{f"encoder.9{k}": v for k, v in _RES.items()},
    "encoder.10": (512, 128, 1, 1),
    "decoder.0": (128, 512, 1, 1),
    **{f"decoder.2{k}": v for k, v in _RES.items()},
    **{f"decoder.3{k}": v for k, v in _RES.items()},
    "decoder.4": (128, 128, 4, 4),  # ConvTranspose2d: [in, out, kh, kw]
    "decoder.6": (128, 64, 4, 4),
    "decoder.8": (64, 32, 4, 4),
    "decoder.10": (32, 16, 4, 4),
    "decoder.12": (1, 16, 1, 1),
}
_TRANSPOSED = {"decoder.4", "decoder.6", "decoder.8", "decoder.10"}


def vae_oid_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"_vq_vae._embedding": (128, 512)}
    for name, shape in VAE_OID_WEIGHTS.items():
        shapes[name + ".weight"] = shape
        shapes[name + ".bias"] = (shape[1] if name in _TRANSPOSED else shape[0],)
    return shapes


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 1),
        )

    def forward(self, x):
        return x + self.net(x)


def _torch_vqvae() -> tuple[nn.Module, nn.Module]:
    """The AiT mask VQ-VAE in torch; nn.Sequential indices give vae-oid's key names."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
        _Res(), _Res(),
        nn.Conv2d(128, 512, 1),
    )  # fmt: skip
    decoder = nn.Sequential(
        nn.Conv2d(512, 128, 1), nn.ReLU(),
        _Res(), _Res(),
        nn.ConvTranspose2d(128, 128, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 1, 1),
    )  # fmt: skip
    return encoder, decoder


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    encoder, decoder = _torch_vqvae()
    # Larger-than-default weights in the res blocks and biases so that every layer matters.
    with torch.no_grad():
        for param in list(encoder.parameters()) + list(decoder.parameters()):
            param.mul_(2.0)
    state = {f"encoder.{k}": v.numpy() for k, v in encoder.state_dict().items()}
    state |= {f"decoder.{k}": v.numpy() for k, v in decoder.state_dict().items()}
    state["_vq_vae._embedding"] = (
        np.random.default_rng(0).normal(0, 0.3, (128, 512)).astype(np.float32)
    )
    path = tmp_path_factory.mktemp("vq") / "torch_vae.npz"
    np.savez(path, **state)
    return path, encoder, decoder, state


def _masks(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    masks = []
    for _ in range(count):
        cy, cx, r = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(5, 30)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32))
    return np.stack(masks)[..., None]


def test_vqvae_state_dict_keys_match_vae_oid(torch_checkpoint):
    *_, state = torch_checkpoint
    assert {k: v.shape for k, v in state.items()} == vae_oid_shapes()


def test_vqvae_matches_torch_oracle(torch_checkpoint):
    path, encoder, decoder, state = torch_checkpoint
    model = vqvae.load(path)
    masks = _masks(5)
    with torch.no_grad():
        inputs = torch.from_numpy(2 * (masks - 0.5)).permute(0, 3, 1, 2)
        features_torch = encoder(inputs).permute(0, 2, 3, 1).numpy()  # [B, 4, 4, 512]
    features = np.asarray(vqvae.encoder(model.params, masks))
    assert features.shape == (5, 4, 4, 512)
    np.testing.assert_allclose(features, features_torch, atol=1e-4, rtol=1e-4)

    codebook = state["_vq_vae._embedding"]
    flat = features_torch.reshape(-1, 512).astype(np.float64)
    distances = ((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    codes_oracle = distances.argmin(-1).reshape(5, 16)
    codes = model.encode(masks)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, codes_oracle)

    with torch.no_grad():
        quantized = torch.from_numpy(codebook[codes_oracle].reshape(5, 4, 4, 512)).permute(
            0, 3, 1, 2
        )
        decoded_torch = decoder(quantized).permute(0, 2, 3, 1).numpy()
    decoded = model.decode(codes)
    assert decoded.shape == (5, 64, 64, 1) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, decoded_torch, atol=1e-4, rtol=1e-4)
    assert np.abs(decoded_torch).max() > 1e-2  # the comparison is not between near-zeros


def test_vqvae_save_writes_vae_oid_layout(torch_checkpoint, tmp_path):
    path, *_, state = torch_checkpoint
    model = vqvae.load(path)
    vqvae.save(model.params, tmp_path / "ours.npz", dtype=np.float32)
    with np.load(tmp_path / "ours.npz") as saved:
        assert set(saved.files) == set(state)
        for key in state:
            np.testing.assert_array_equal(saved[key], state[key], err_msg=key)
    vqvae.save(model.params, tmp_path / "half.npz")  # default float16: half the bytes, same codes
    half = vqvae.load(tmp_path / "half.npz")
    with np.load(tmp_path / "half.npz") as saved:
        assert saved["decoder.4.weight"].dtype == np.float16
    assert (half.encode(_masks(8)) == model.encode(_masks(8))).mean() > 0.9


def test_vqvae_random_vae_oid_npz_with_extra_keys_loads_and_runs(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in vae_oid_shapes().items()}
    arrays["_vq_vae._ema_w"] = rng.normal(size=(128, 512)).astype(np.float32)  # unused keys
    arrays["_vq_vae._ema_cluster_size"] = np.ones(128, np.float32)
    arrays["quant_conv.weight"] = np.ones((3, 3), np.float32)
    np.savez(tmp_path / "vae.npz", **arrays)
    model = vqvae.load(tmp_path / "vae.npz")
    codes = model.encode(_masks(3))
    assert codes.shape == (3, 16) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 128
    logits = model.decode(codes)
    assert logits.shape == (3, 64, 64, 1) and np.isfinite(logits).all()


def test_vqvae_reads_bfloat16_and_params_prefix():
    import ml_dtypes

    rng = np.random.default_rng(2)
    arrays = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in vae_oid_shapes().items()}
    stored = {  # numpy writes bfloat16 as 2-byte void
        f"params/{k}": v.astype(ml_dtypes.bfloat16).view(np.dtype("V2")) for k, v in arrays.items()
    }
    params = vqvae.params_from_torch(stored)
    expected = arrays["_vq_vae._embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params["codebook"]), expected)


def test_vqvae_load_names_missing_key_and_wrong_shape(tmp_path):
    arrays = {k: np.zeros(s, np.float32) for k, s in vae_oid_shapes().items()}
    del arrays["decoder.6.weight"]
    arrays["encoder.10.bias"] = np.zeros(511, np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"missing key 'decoder.6.weight' \(expected shape \(128, 64, 4, 4\)\)"
    ):
        vqvae.load(tmp_path / "bad.npz")
    with pytest.raises(
        ValueError, match=r"'encoder.10.bias' has shape \(511,\), expected \(512,\)"
    ):
        vqvae.load(tmp_path / "bad.npz")


def test_vqvae_batches_are_padded_consistently(torch_checkpoint):
    path, *_ = torch_checkpoint
    model = vqvae.load(path)
    masks = _masks(10, seed=3)
    together = model.encode(masks)  # bucket 32
    one_by_one = np.concatenate([model.encode(m[None]) for m in masks[:3]])  # bucket 1
    np.testing.assert_array_equal(together[:3], one_by_one)
    assert model.encode(np.zeros((0, 64, 64, 1))).shape == (0, 16)
    assert model.decode(np.zeros((0, 16), np.int32)).shape == (0, 64, 64, 1)
    with pytest.raises(ValueError, match="float\\[B, 64, 64, 1\\]"):
        model.encode(np.zeros((2, 32, 32, 1)))


@pytest.mark.slow  # compiles the training step: about 25 s of CPU
def test_train_step_updates_params_and_codebook_and_restarts_dead_codes():
    from paligemma_seg.segtokens import train_vqvae

    cfg = train_vqvae.TrainConfig(steps=10, batch_size=4, warmup_steps=1)
    tx = train_vqvae.make_optimizer(cfg)
    state = train_vqvae.init_state(cfg, tx)
    before = {k: np.asarray(v) for k, v in state.params.items()}
    codebook_before = np.asarray(state.codebook)
    step = train_vqvae.make_train_step(cfg, tx)
    masks = _masks(4, seed=5)
    state, metrics = step(state, masks)
    state, metrics = step(state, masks)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    assert float(np.asarray(metrics["counts"]).sum()) == 4 * 16
    assert not np.allclose(before["dec_up3/kernel"], np.asarray(state.params["dec_up3/kernel"]))
    used = np.flatnonzero(np.asarray(metrics["counts"]))
    assert not np.allclose(
        codebook_before[used], np.asarray(state.codebook)[used]
    )  # EMA moved them
    dead = np.setdiff1d(np.arange(128), used)[:5]
    restarted = train_vqvae.restart_dead_codes(
        state, dead, state.params, masks, np.random.default_rng(0)
    )
    features = np.asarray(vqvae.encoder(state.params, masks)).reshape(-1, 512)
    for code in dead:  # each restarted code sits next to one of the batch's encoder outputs
        distances = np.abs(features - np.asarray(restarted.codebook)[code]).max(-1)
        assert distances.min() < 1e-2 * np.abs(features).max()


def test_soft_iou_loss_by_hand():
    from paligemma_seg.segtokens import train_vqvae

    targets = np.zeros((2, 64, 64, 1), np.float32)
    targets[0, :8, :8] = 1.0  # 64 pixels of water; crop 1 is empty
    logits = np.full_like(targets, -1e4)
    logits[0, :8, :4] = 1e4  # predicts half of it: I = 32, U = 64
    # crop 0: 1 - 33/65; crop 1 (empty vs empty): 1 - 1/1 = 0
    want = (1 - 33 / 65 + 0.0) / 2
    got = float(train_vqvae.soft_iou_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert abs(got - want) < 1e-6
    logits[1, 0, 0] = 0.0  # sigmoid 0.5 on one pixel of the empty crop: U = 0.5
    got = float(train_vqvae.soft_iou_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert abs(got - (1 - 33 / 65 + 1 - 1 / 1.5) / 2) < 1e-6


def test_init_state_starts_from_a_vae_oid_file(tmp_path):
    from paligemma_seg.segtokens import train_vqvae

    params = vqvae.init_params(jax.random.PRNGKey(3))
    path = tmp_path / "start.npz"
    vqvae.save(params, str(path))
    stored = vqvae.load(str(path)).params
    cfg = train_vqvae.TrainConfig(init=str(path), warmup_steps=1)
    state = train_vqvae.init_state(cfg, train_vqvae.make_optimizer(cfg))
    np.testing.assert_array_equal(state.codebook, np.asarray(stored["codebook"], np.float32))
    np.testing.assert_array_equal(state.ema_sum, state.codebook)  # the EMA starts at the codebook
    for key, value in state.params.items():
        np.testing.assert_array_equal(value, np.asarray(stored[key], np.float32), err_msg=key)
    fresh = train_vqvae.init_state(train_vqvae.TrainConfig(), train_vqvae.make_optimizer(cfg))
    assert not np.allclose(fresh.codebook, state.codebook)
