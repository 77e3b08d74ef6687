"""Weights: big_vision .npz and Hugging Face safetensors <-> our tree, export, presets, errors.

transformers (torch, CPU) is the oracle: tiny random PaliGemma 1/2 models from `model_fixtures`.
The jax-vs-transformers logits check is in test_model_parity.py; here the mapping is checked layer
by layer against the torch modules, and the exported directory against transformers itself.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from model_fixtures import (
    build_hf_tiny,
    hf_inputs,
    make_batch,
    meta_hf_shapes,
    our_tiny_config,
    published_hf_config,
)

from paligemma_seg import weights
from paligemma_seg.model.config import get_preset
from paligemma_seg.weights import WeightsError
from paligemma_seg.weights import __main__ as weights_cli
from paligemma_seg.weights import hf as weights_hf
from paligemma_seg.weights import hf_convert as weights_hf_convert
from paligemma_seg.weights import safetensors as weights_safetensors
from paligemma_seg.weights.config import (
    config_from_shapes,
    describe_fit,
    shapes_from_config,
)
from paligemma_seg.weights.spec import expected_shapes, flatten, unflatten

VERSIONS = [1, 2]


@pytest.fixture(scope="module", params=VERSIONS, ids=["pg1", "pg2"])
def tiny(request, tmp_path_factory) -> tuple[int, transformers.PreTrainedModel, pathlib.Path]:
    """(version, transformers model, its save_pretrained directory)."""
    model = build_hf_tiny(request.param, seed=request.param)
    directory = tmp_path_factory.mktemp(f"hf_pg{request.param}")
    model.save_pretrained(directory)
    return request.param, model, directory


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> pathlib.Path:
    """A tiny PaliGemma 2 .npz (float32) for the error and CLI tests."""
    params, _ = weights.params_from_hf_state_dict(_state_dict(build_hf_tiny(2)), _config(2))
    return weights.save_npz(params, tmp_path_factory.mktemp("npz") / "tiny.npz")


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _config(version: int) -> transformers.PaliGemmaConfig:
    return build_hf_tiny(version).config


def _hub_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Hub-style names (vision_tower.vision_model.*, language_model.model.*), numpy, no lm_head."""
    return {
        weights_hf.canonical_name(k): v.numpy()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def _assert_trees_identical(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


# ---------------------------------------------------------------- round trips and key styles


def test_hf_roundtrip_through_npz_is_bit_exact(tiny, tmp_path):
    version, model, directory = tiny
    params, info = weights.load_hf(directory)
    assert info.format == "hf" and info.dtypes == ("float32",)
    path = weights.save_npz(params, tmp_path / "model.npz")
    reloaded, npz_info = weights.load_npz(path)
    _assert_trees_identical(params, reloaded)
    assert npz_info.key_style == "img/*, llm/*"
    exported = weights.params_to_hf_state_dict(reloaded)
    original = _hub_state_dict(model)
    assert sorted(exported) == sorted(original)
    for name, array in exported.items():
        assert (
            array.dtype == original[name].dtype and array.tobytes() == original[name].tobytes()
        ), name


def test_save_pretrained_key_style_is_recorded(tiny):
    """transformers 5.x save_pretrained writes vision_tower.* (no vision_model) and language_model.model.*."""
    _, _, directory = tiny
    with weights_safetensors.SafetensorsReader(directory) as reader:
        names = list(reader.shapes)
    assert "lm_head.weight" not in names  # tied: not saved
    assert weights_hf.key_style(names) == (
        "language_model.model.*, multi_modal_projector.*, vision_tower.*"
    )


def _renamed(state_dict: dict, style: str) -> dict:
    """A hub-style state dict in one of the other key styles seen in the wild."""
    prefixes = {
        "hub": {},
        "transformers4": {  # transformers 4.5x in memory
            "vision_tower.vision_model.": "model.vision_tower.vision_model.",
            "language_model.model.": "model.language_model.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        },
        "transformers5_saved": {"vision_tower.vision_model.": "vision_tower."},
    }[style]
    out = {}
    for name, value in state_dict.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        out[prefixes[prefix] + name[len(prefix) :] if prefix else name] = value
    return out


@pytest.mark.parametrize("style", ["hub", "transformers4", "transformers5_saved", "in_memory"])
def test_every_key_style_gives_the_same_tree(style):
    model = build_hf_tiny(2)
    reference, _ = weights.params_from_hf_state_dict(_hub_state_dict(model), model.config)
    if (
        style == "in_memory"
    ):  # transformers 5.x: model.vision_tower.*, model.language_model.*, lm_head
        state_dict = _state_dict(model)
        assert "model.vision_tower.encoder.layers.0.mlp.fc1.weight" in state_dict
    else:
        state_dict = _renamed(_hub_state_dict(model), style)
    params, info = weights.params_from_hf_state_dict(state_dict, model.config.to_dict())
    _assert_trees_identical(reference, params)
    if style == "in_memory":
        assert any("lm_head.weight (equal to the tied embedding)" in n for n in info.notes)


def test_sharded_safetensors_with_index_loads(tiny, tmp_path):
    version, model, directory = tiny
    params, _ = weights.load_hf(directory)
    out = weights.save_hf(
        params, our_tiny_config(version), tmp_path / "sharded", max_shard_bytes=20_000
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(_hub_state_dict(model))
    reloaded, _ = weights.load_hf(out)
    _assert_trees_identical(params, reloaded)


# ---------------------------------------------------------------- the mapping, layer by layer


@torch.no_grad()
def _check_text_layer(model, params, version: int) -> None:
    layer = model.model.language_model.layers[1]
    llm = params["llm"]["layers"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64).astype(np.float32)
    heads = lambda t, n: t.numpy().reshape(n, -1)
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(
        heads(layer.self_attn.q_proj(tx), 4),
        np.einsum("D,NDH->NH", x, llm["attn"]["q_einsum"]["w"][1]),
        atol=1e-5,
    )
    for slot, proj in enumerate((layer.self_attn.k_proj, layer.self_attn.v_proj)):
        ours = np.einsum("D,KDH->KH", x, llm["attn"]["kv_einsum"]["w"][1, slot])
        np.testing.assert_allclose(heads(proj(tx), 2), ours, atol=1e-5)
    y = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(
        layer.self_attn.o_proj(torch.from_numpy(y.reshape(-1))).numpy(),
        np.einsum("NH,NHD->D", y, llm["attn"]["attn_vec_einsum"]["w"][1]),
        atol=1e-5,
    )
    gating = llm["mlp"]["gating_einsum"][1]
    np.testing.assert_allclose(layer.mlp.gate_proj(tx).numpy(), x @ gating[0], atol=1e-5)
    np.testing.assert_allclose(layer.mlp.up_proj(tx).numpy(), x @ gating[1], atol=1e-5)
    z = rng.standard_normal(128).astype(np.float32)
    np.testing.assert_allclose(
        layer.mlp.down_proj(torch.from_numpy(z)).numpy(), z @ llm["mlp"]["linear"][1], atol=1e-5
    )
    norms = {"input_layernorm": "pre_attention_norm"}
    if version == 1:
        norms["post_attention_layernorm"] = "pre_ffw_norm"
    else:
        norms.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="pre_ffw_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    for hf_name, our_name in norms.items():
        np.testing.assert_array_equal(
            getattr(layer, hf_name).weight.numpy(), llm[our_name]["scale"][1]
        )


@torch.no_grad()
def _check_vision(model, params) -> None:
    vision = model.model.vision_tower
    img = params["img"]
    block = img["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]
    layer = vision.encoder.layers[1]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32).astype(np.float32)
    for name, proj in (("query", layer.self_attn.q_proj), ("key", layer.self_attn.k_proj)):
        ours = np.einsum("W,WNH->NH", x, block[name]["kernel"][1]) + block[name]["bias"][1]
        np.testing.assert_allclose(proj(torch.from_numpy(x)).numpy().reshape(4, 8), ours, atol=1e-5)
    y = rng.standard_normal((4, 8)).astype(np.float32)
    ours = np.einsum("NH,NHW->W", y, block["out"]["kernel"][1]) + block["out"]["bias"][1]
    np.testing.assert_allclose(
        layer.self_attn.out_proj(torch.from_numpy(y.reshape(-1))).numpy(), ours, atol=1e-5
    )
    patch = rng.standard_normal((14, 14, 3)).astype(np.float32)
    conv = vision.embeddings.patch_embedding(
        torch.from_numpy(patch.transpose(2, 0, 1).copy())[None]
    )
    ours = np.einsum("hwc,hwcW->W", patch, img["embedding"]["kernel"]) + img["embedding"]["bias"]
    np.testing.assert_allclose(conv.numpy()[0, :, 0, 0], ours, atol=1e-5)
    np.testing.assert_array_equal(
        vision.embeddings.position_embedding.weight.numpy(), img["pos_embedding"][0]
    )
    head = model.model.multi_modal_projector.linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(head, x @ img["head"]["kernel"] + img["head"]["bias"], atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_mapping_agrees_with_torch_layers(version):
    """Each mapped tensor computes what its torch module computes (catches a consistent-but-wrong layout)."""
    model = build_hf_tiny(version)
    params, _ = weights.params_from_hf_state_dict(_state_dict(model), model.config)
    _check_text_layer(model, params, version)
    _check_vision(model, params)


@pytest.mark.parametrize("name", ["pg1-3b-224", "pg2-3b-224", "pg2-10b-224"])
def test_full_size_hf_shapes_map_onto_the_preset_tree(name):
    """Meta-device transformers models: every tensor maps, the shapes equal our preset's, counts agree."""
    hf_shapes = {weights_hf.canonical_name(k): v for k, v in meta_hf_shapes(name).items()}
    sizes = weights_hf.shapes_from_hf(published_hf_config(name), hf_shapes)
    assert weights_hf.hf_shapes(sizes) == {
        k: v for k, v in hf_shapes.items() if k != "lm_head.weight"
    }
    kept = dataclasses.replace(sizes, vocab_size=weights_hf_convert.kept_vocab(sizes.vocab_size))
    assert kept == shapes_from_config(get_preset(name))
    counts = {"pg1-3b-224": 2_923_335_408, "pg2-3b-224": 3_032_094_960}  # big_vision's eval_shape
    if name in counts:
        assert sum(int(np.prod(s)) for s in expected_shapes(kept).values()) == counts[name]


def test_hub_padding_rows_rule():
    assert weights_hf_convert.kept_vocab(257_216) == 257_152
    assert weights_hf_convert.kept_vocab(300) == 300
    assert weights_hf_convert.kept_vocab(257_216, 257_216) == 257_216
    model = build_hf_tiny(1)
    params, info = weights.params_from_hf_state_dict(
        _state_dict(model), model.config, vocab_size=280
    )
    assert params["llm"]["embedder"]["input_embedding"].shape == (280, 64)
    assert any("dropped 20 padding rows" in n for n in info.notes)
    with pytest.raises(WeightsError, match=r"vocab_size=400 must be in 1\.\.300"):
        weights.params_from_hf_state_dict(_state_dict(model), model.config, vocab_size=400)


# ---------------------------------------------------------------- export to transformers


def test_exported_directory_gives_transformers_the_same_logits(tiny, tmp_path):
    version, model, directory = tiny
    params, _ = weights.load_hf(directory)
    out = weights.save_hf(params, our_tiny_config(version), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert not list(tmp_path.glob(".export*")), "temporary directory left behind"
    loaded, loading_info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    config = our_tiny_config(version)
    batch = make_batch(config, prefix_lengths=[3, 5], suffix_lengths=[6, 2], seed=version)
    inputs = hf_inputs(batch, config.vision.num_patches)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = loaded.eval()(**inputs).logits
    assert torch.equal(expected, got)


def test_exported_config_json_describes_the_model(tmp_path):
    params, _ = weights.params_from_hf_state_dict(_state_dict(build_hf_tiny(2)), _config(2))
    out = weights.save_hf(params, None, tmp_path / "bv", compat="big_vision")
    config = json.loads((out / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "paligemma" and config["image_token_index"] == 300
    assert text["model_type"] == "gemma2" and text["hidden_activation"] == "gelu_pytorch_tanh"
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (
        4,
        2,
        16,
    )
    assert text["final_logit_softcapping"] is None  # big_vision: text logits not capped
    assert text["layer_types"] == ["full_attention", "full_attention"]  # big_vision: no window
    assert vision["model_type"] == "siglip_vision_model" and vision["vision_use_head"] is False
    assert (vision["image_size"], vision["patch_size"], config["projection_dim"]) == (42, 14, 64)


# ---------------------------------------------------------------- npz details


def test_bf16_npz_is_stored_as_void_and_loads_as_bfloat16(tmp_path):
    params, _ = weights.params_from_hf_state_dict(
        _state_dict(build_hf_tiny(1)), _config(1), dtype="bfloat16"
    )
    path = weights.save_npz(params, tmp_path / "bf16.npz")
    with np.load(path, allow_pickle=False) as raw:
        assert raw["llm/final_norm/scale"].dtype == np.dtype("V2")
    loaded, info = weights.load_npz(path)
    assert info.dtypes == ("bfloat16",)
    _assert_trees_identical(params, loaded)
    assert loaded["llm"]["final_norm"]["scale"].dtype == ml_dtypes.bfloat16
    exported, _ = weights.load_hf(weights.save_hf(loaded, None, tmp_path / "bf16_hf"))
    _assert_trees_identical(params, exported)  # BF16 safetensors read back through numpy


def test_params_prefix_and_float16_accepted(tmp_path, tiny_npz):
    reference, _ = weights.load_npz(tiny_npz)
    flat = {f"params/{k}": v.astype(np.float16) for k, v in _flat(reference).items()}
    np.savez(tmp_path / "prefixed.npz", **flat)
    loaded, info = weights.load_npz(tmp_path / "prefixed.npz")
    assert info.key_style == "params/*" and info.dtypes == ("float16",)
    _assert_trees_identical(unflatten({k[7:]: v for k, v in flat.items()}), loaded)
    cast, _ = weights.load_npz(tmp_path / "prefixed.npz", dtype="float32")
    assert cast["llm"]["final_norm"]["scale"].dtype == np.float32


# ---------------------------------------------------------------- load(): the config from shapes


@pytest.mark.parametrize("version", VERSIONS)
def test_load_reads_sizes_and_variant_from_shapes(version, tmp_path):
    model = build_hf_tiny(version)
    params, _ = weights.params_from_hf_state_dict(_state_dict(model), model.config)
    path = weights.save_npz(params, tmp_path / "m.npz")
    ours, loaded = weights.load(path)
    expected = our_tiny_config(version)
    assert ours.config.vision == expected.vision
    llm = ours.config.llm
    assert (
        llm.width,
        llm.depth,
        llm.mlp_dim,
        llm.num_heads,
        llm.num_kv_heads,
        llm.head_dim,
        llm.vocab_size,
    ) == (64, 2, 128, 4, 2, 16, 300)
    assert llm.post_norms == (version == 2)
    assert llm.attn_logits_softcap == (50.0 if version == 2 else None)  # PaliGemma 2's preset value
    assert llm.sliding_window is None and not llm.final_logits_softcap  # big_vision compat
    assert ours.config.param_dtype == "float32"
    _assert_trees_identical(params, loaded)
    if version == 2:
        tf_model, _ = weights.load(
            path, compat="transformers", dtype="bfloat16", param_dtype="bfloat16"
        )
        assert (
            tf_model.config.llm.sliding_window and tf_model.config.llm.final_logits_softcap == 30.0
        )
        assert tf_model.config.dtype == "bfloat16"
        assert tf_model.config.param_dtype == "bfloat16"


def test_load_of_hf_directory_builds_the_same_model(tiny):
    version, _, directory = tiny
    ours, params = weights.load(directory)
    assert ours.config.llm.post_norms == (version == 2)
    reference, _ = weights.load_hf(directory)
    _assert_trees_identical(reference, params)


@pytest.mark.parametrize("name", ["pg1-3b-448", "pg2-3b-224", "pg2-10b-896", "pg2-28b-224"])
def test_config_from_shapes_recovers_every_preset(name):
    for compat in ("big_vision", "transformers"):
        preset = get_preset(name, compat=compat)
        assert config_from_shapes(shapes_from_config(preset), compat=compat) == preset
    assert describe_fit(shapes_from_config(get_preset(name))).endswith(f"fit preset {name}.")


# ---------------------------------------------------------------- bad input: one clear message


def _npz_without(tiny_npz: pathlib.Path, path: pathlib.Path, drop=(), **extra) -> pathlib.Path:
    with np.load(tiny_npz) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    np.savez(path, **arrays, **extra)
    return path


def test_missing_file_and_directory_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such checkpoint file: .*nope.npz"):
        weights.load_npz(tmp_path / "nope.npz")
    with pytest.raises(WeightsError, match="no such checkpoint directory"):
        weights.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has no config.json"):
        weights.load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(
        WeightsError, match="holds neither model.safetensors nor model.safetensors.index.json"
    ):
        weights.load_hf(tmp_path / "empty")


def test_truncated_npz_names_the_file(tiny_npz, tmp_path):
    data = tiny_npz.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cannot read .*cut\.npz.*truncated"):
        weights.load_npz(tmp_path / "cut.npz")


def test_corrupt_npz_member_names_file_and_key(tiny_npz, tmp_path):
    with zipfile.ZipFile(tiny_npz) as zf:
        info = zf.getinfo("llm/embedder/input_embedding.npy")
    data = bytearray(tiny_npz.read_bytes())
    middle = info.header_offset + 200 + info.file_size // 2
    data[middle : middle + 8] = (
        b"\xff" * 8
    )  # array bytes, after the .npy header: only the CRC notices
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(
        WeightsError, match=r"cannot read 'llm/embedder/input_embedding.npy' in .*bad\.npz"
    ):
        weights.load_npz(tmp_path / "bad.npz")


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    _, _, directory = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((directory / "config.json").read_bytes())
    data = (directory / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"cannot read .*broken/model\.safetensors.*truncated"):
        weights.load_hf(broken)


def test_missing_and_unexpected_keys_are_listed(tiny_npz, tmp_path):
    path = _npz_without(
        tiny_npz, tmp_path / "k.npz", drop={"llm/final_norm/scale"}, **{"extra/thing": np.zeros(2)}
    )
    with pytest.raises(
        WeightsError,
        match=r"Missing keys \(1\): llm/final_norm/scale\. Unexpected keys \(1\): extra/thing\.",
    ):
        weights.load_npz(path)
    with np.load(tiny_npz) as data:
        keep = {"img/embedding/bias"}
        path = _npz_without(tiny_npz, tmp_path / "few.npz", drop=set(data.files) - keep)
    with pytest.raises(
        WeightsError, match=r"Missing keys \(31\): (img/[^,]+, ){19}img/[^,]+ \.\.\. and 11 more\.$"
    ):
        weights.load_npz(path)


def test_hf_missing_tensor_is_listed():
    model = build_hf_tiny(1)
    state_dict = _hub_state_dict(model)
    del state_dict["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        WeightsError, match=r"Missing keys \(1\): language_model\.model\.layers\.1\.mlp\.up_proj"
    ):
        weights.params_from_hf_state_dict(state_dict, model.config)


def test_untied_lm_head_is_rejected():
    model = build_hf_tiny(1)
    state_dict = _hub_state_dict(model)
    state_dict["lm_head.weight"] = state_dict["language_model.model.embed_tokens.weight"] + 1
    with pytest.raises(WeightsError, match="lm_head.weight differs from the token embedding"):
        weights.params_from_hf_state_dict(state_dict, model.config)


def test_inconsistent_shape_names_key_expected_and_found(tiny_npz, tmp_path):
    with np.load(tiny_npz) as data:
        bad = data["llm/layers/attn/q_einsum/w"][..., :8]
    path = _npz_without(tiny_npz, tmp_path / "s.npz", drop={"llm/layers/attn/q_einsum/w"})
    with zipfile.ZipFile(path, "a") as zf, zf.open("llm/layers/attn/q_einsum/w.npy", "w") as f:
        np.lib.format.write_array(f, bad)
    with pytest.raises(
        WeightsError,
        match=r"llm/layers/attn/attn_vec_einsum/w: expected \(2, 4, 8, 64\), found \(2, 4, 16, 64\)",
    ):
        weights.load_npz(path)


def test_preset_mismatch_says_which_preset_fits(tiny_npz):
    with pytest.raises(WeightsError, match=r"PaliGemma 2 \(post-norms\) .* asks for PaliGemma 1"):
        weights.load(tiny_npz, preset="pg1-3b-224")
    with pytest.raises(
        WeightsError,
        match=r"(?s)img/embedding/kernel: expected \(14, 14, 3, 1152\), found \(14, 14, 3, 32\).*No preset has",
    ):
        weights.load(tiny_npz, preset="pg2-3b-224")
    with pytest.raises(
        WeightsError, match=r"llm/layers/mlp/linear: expected \(3, 128, 64\), found \(2, 128, 64\)"
    ):
        weights.load(tiny_npz, llm={"depth": 3})


def test_hf_config_disagreeing_with_tensors():
    config = _config(1).to_dict()
    config["text_config"]["head_dim"] = 8
    with pytest.raises(WeightsError, match=r"q_proj.weight: expected \(32, 64\), found \(64, 64\)"):
        weights.params_from_hf_state_dict(_hub_state_dict(build_hf_tiny(1)), config)


def test_unsupported_dtypes_are_named(tiny_npz, tmp_path):
    with np.load(tiny_npz) as data:
        as_int = data["llm/final_norm/scale"].astype(np.int32)
    path = _npz_without(
        tiny_npz,
        tmp_path / "i.npz",
        drop={"llm/final_norm/scale"},
        **{"llm/final_norm/scale": as_int},
    )
    with pytest.raises(
        WeightsError, match=r"unsupported dtype in 1 array\(s\): llm/final_norm/scale \(int32\)"
    ):
        weights.load_npz(path)
    with pytest.raises(WeightsError, match="unsupported dtype int8"):
        weights.load_npz(tiny_npz, dtype="int8")
    state_dict = _hub_state_dict(build_hf_tiny(1))
    state_dict["language_model.model.norm.weight"] = state_dict[
        "language_model.model.norm.weight"
    ].astype(np.float64)
    with pytest.raises(WeightsError, match=r"language_model.model.norm.weight \(float64\)"):
        weights.params_from_hf_state_dict(state_dict, _config(1))


def test_pickle_requiring_npz_is_refused(tiny_npz, tmp_path):
    objects = np.array([{"a": 1}], dtype=object)
    path = _npz_without(tiny_npz, tmp_path / "p.npz", **{"llm/extra": objects})
    with pytest.raises(WeightsError, match="holds Python objects .* refused"):
        weights.load_npz(path)


# ---------------------------------------------------------------- atomic writes and the CLI


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_writes_leave_nothing(tiny_npz, tmp_path, monkeypatch):
    params, _ = weights.load_npz(tiny_npz)
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = weights_safetensors.save_file
    monkeypatch.setattr(weights_safetensors, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        weights.save_hf(params, None, tmp_path / "hf", max_shard_bytes=20_000)
    monkeypatch.setattr(np.lib.format, "write_array", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        weights.save_npz(params, tmp_path / "out.npz")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tiny_npz, tmp_path):
    params, _ = weights.load_npz(tiny_npz)
    (tmp_path / "hf").mkdir()
    with pytest.raises(WeightsError, match="already exists; remove it or pass overwrite=True"):
        weights.save_hf(params, None, tmp_path / "hf")
    out = weights.save_hf(params, None, tmp_path / "hf", overwrite=True)
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "hf"
    ]


def test_cli_info_and_convert_both_ways(tiny_npz, tmp_path, capsys):
    assert weights_cli.main(["info", str(tiny_npz)]) == 0
    printed = capsys.readouterr().out
    assert "PaliGemma 2" in printed and "dtype:      float32" in printed
    assert "parameters: " in printed and "preset:     none" in printed
    assert weights_cli.main(["convert", str(tiny_npz), str(tmp_path / "hf")]) == 0
    assert weights_cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.npz")]) == 0
    _assert_trees_identical(
        weights.load_npz(tiny_npz)[0], weights.load_npz(tmp_path / "back.npz")[0]
    )
    capsys.readouterr()
    assert weights_cli.main(["info", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such checkpoint file") and "Traceback" not in err
    assert weights_cli.main(["convert", str(tiny_npz), str(tmp_path / "again.npz")]) == 2
    assert "needs a directory (not *.npz) as destination" in capsys.readouterr().err
