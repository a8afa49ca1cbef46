"""LoRA files in the diffusers/peft and kohya layouts: round trips, the names and shapes each
layout writes, per-module scales, and the files and models refused."""

import json
import pickle

import numpy as np
import pytest
import safetensors

from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.interop.lora import LoraWeights, check_lora, convert_lora, load_lora, save_lora
from ldm_jax.interop.safetensors_io import PickleRefusedError, write_safetensors
from ldm_jax.models.lora import DOWN, UP, adapter_paths

RANK, ALPHA = 4, 8.0
ATTENTION = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1")


def adapter(rng, kernel_shape, rank=RANK):
    down = rng.normal(size=(*kernel_shape[:-1], rank)).astype(np.float32)
    return {DOWN: down, UP: rng.normal(size=(rank, kernel_shape[-1])).astype(np.float32)}


def example_weights(conv_rank=RANK) -> LoraWeights:
    """Dense and convolution adapters in both components; the convolutions of `conv_rank`."""
    rng = np.random.default_rng(0)
    unet = {
        "down_blocks_0": {
            "attentions_0": {
                "transformer_blocks_0": {
                    "attn1": {"to_q": adapter(rng, (8, 8)), "to_out_0": adapter(rng, (8, 8))}
                },
                "proj_in": adapter(rng, (1, 1, 8, 8), conv_rank),
            },
            "resnets_0": {"conv1": adapter(rng, (3, 3, 8, 16), conv_rank)},
        },
        "time_embedding": {"linear_1": adapter(rng, (8, 32))},
    }
    text_encoder = {
        "encoder": {
            "layers_0": {
                "self_attn": {"to_q": adapter(rng, (6, 6)), "to_out_0": adapter(rng, (6, 6))},
                "mlp": {"fc1": adapter(rng, (6, 12))},
            }
        }
    }
    return LoraWeights(unet=unet, text_encoder=text_encoder, rank=RANK, alpha=ALPHA)


def kernels_of(adapters) -> dict:
    """A params tree whose kernels the adapters fit."""
    params: dict = {}
    for path in adapter_paths(adapters):
        node = adapters
        for key in path:
            node = node[key]
        target = params
        for key in path:
            target = target.setdefault(key, {})
        target["kernel"] = np.zeros((*node[DOWN].shape[:-1], node[UP].shape[-1]), np.float32)
    return params


def assert_same_adapters(got: LoraWeights, want: LoraWeights) -> None:
    assert (got.rank, got.alpha) == (want.rank, want.alpha)
    for component, adapters in want.components().items():
        paths = sorted(adapter_paths(adapters))
        assert sorted(adapter_paths(got.components()[component])) == paths
        for path in paths:
            got_node, want_node = got.components()[component], adapters
            for key in path:
                got_node, want_node = got_node[key], want_node[key]
            for role in (DOWN, UP):
                assert got_node[role].dtype == np.float32
                np.testing.assert_array_equal(got_node[role], want_node[role])


def tensors_and_metadata(path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(path), framework="np") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def one_line_error(error_info) -> str:
    message = str(error_info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("conv_rank", [RANK, 2], ids=["one-rank", "mixed-ranks"])
@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_round_trip_is_bit_identical(tmp_path, format, conv_rank):
    weights = example_weights(conv_rank)
    path = tmp_path / "lora.safetensors"
    save_lora(path, weights, format=format)
    assert_same_adapters(load_lora(path), weights)


def test_diffusers_layout_names_shapes_and_metadata(tmp_path):
    save_lora(tmp_path / "pytorch_lora_weights.safetensors", example_weights(conv_rank=2))
    tensors, metadata = tensors_and_metadata(tmp_path / "pytorch_lora_weights.safetensors")
    attention = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    text = "text_encoder.text_model.encoder.layers.0"
    shapes = {
        f"{attention}.to_out.0.lora_A.weight": (RANK, 8),
        f"{attention}.to_out.0.lora_B.weight": (8, RANK),
        "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": (2, 8, 3, 3),
        "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": (16, 2, 1, 1),
        "unet.time_embedding.linear_1.lora_B.weight": (32, RANK),
        f"{text}.self_attn.q_proj.lora_A.weight": (RANK, 6),
        f"{text}.self_attn.out_proj.lora_B.weight": (6, RANK),
        f"{text}.mlp.fc1.lora_B.weight": (12, RANK),
    }
    assert {key: tensors[key].shape for key in shapes} == shapes
    assert len(tensors) == 2 * 8
    # diffusers' load_lora_weights builds peft's LoraConfig from this: rank, alpha, and the
    # alpha of the modules of another rank (scale alpha / rank everywhere).
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (RANK, ALPHA)
    assert config["unet.rank_pattern"] == {
        "down_blocks.0.attentions.0.proj_in": 2,
        "down_blocks.0.resnets.0.conv1": 2,
    }
    assert set(config["unet.alpha_pattern"].values()) == {ALPHA / RANK * 2}
    assert "encoder.layers.0.self_attn.q_proj" in config["text_encoder.target_modules"]


def test_kohya_layout_names_shapes_and_alphas(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, example_weights(conv_rank=2), format="kohya")
    tensors, metadata = tensors_and_metadata(path)
    attention = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    text = "lora_te_text_model_encoder_layers_0"
    shapes = {
        f"{attention}_to_out_0.lora_down.weight": (RANK, 8),
        f"{attention}_to_out_0.lora_up.weight": (8, RANK),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (2, 8, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (16, 2, 1, 1),
        "lora_unet_time_embedding_linear_1.lora_up.weight": (32, RANK),
        f"{text}_self_attn_q_proj.lora_down.weight": (RANK, 6),
        f"{text}_mlp_fc1.lora_up.weight": (12, RANK),
    }
    assert {key: tensors[key].shape for key in shapes} == shapes
    assert len(tensors) == 3 * 8
    assert tensors[f"{attention}_to_out_0.alpha"].item() == ALPHA
    # A module of rank 2 has the alpha that keeps the one scale.
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == ALPHA / RANK * 2
    assert metadata["ss_network_dim"] == str(RANK)


def test_per_module_alphas_fold_into_up(tmp_path):
    rng = np.random.default_rng(1)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_"
    alphas = {"q": 2.0, "k": 2.0, "v": 1.0, "out_0": None}  # scales 1/2, 1/2, 1/4, 1 (no alpha)
    tensors = {}
    for name, alpha in alphas.items():
        tensors[f"{module}{name}.lora_down.weight"] = rng.normal(size=(4, 8)).astype(np.float32)
        tensors[f"{module}{name}.lora_up.weight"] = rng.normal(size=(8, 4)).astype(np.float32)
        if alpha is not None:
            tensors[f"{module}{name}.alpha"] = np.asarray(alpha, np.float16)
    write_safetensors(tensors, tmp_path / "lora.safetensors")
    weights = load_lora(tmp_path / "lora.safetensors")
    assert (weights.rank, weights.alpha) == (4, 2.0)  # most modules'
    attention = weights.unet[ATTENTION[0]][ATTENTION[1]][ATTENTION[2]][ATTENTION[3]]
    for name, scale in (("q", 0.5), ("k", 0.5), ("v", 0.25), ("out_0", 1.0)):
        down = tensors[f"{module}{name}.lora_down.weight"]
        up = tensors[f"{module}{name}.lora_up.weight"]
        ours = attention[f"to_{name}"]
        np.testing.assert_array_equal(ours[DOWN], down.T)
        np.testing.assert_allclose(
            weights.scale * ours[DOWN] @ ours[UP], scale * down.T @ up.T, rtol=1e-6
        )
    np.testing.assert_array_equal(attention["to_q"][UP], tensors[f"{module}q.lora_up.weight"].T)


def test_names_older_diffusers_wrote(tmp_path):
    rng = np.random.default_rng(2)
    pair = lambda: {"down": rng.normal(size=(2, 4)), "up": rng.normal(size=(4, 2))}
    prefixes = {
        # attention processors (diffusers < 0.21)
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.{}.weight": (
            "unet",
            ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_out_0"),
        ),
        # LoRACompatibleLinear (diffusers 0.21-0.24, and its training scripts' conversion)
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.lora.{}.weight": (
            "unet",
            ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_v"),
        ),
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_linear_layer.{}.weight": (
            "text_encoder",
            ("encoder", "layers_1", "self_attn", "to_k"),
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.{}.weight": (
            "text_encoder",
            ("encoder", "layers_0", "self_attn", "to_q"),
        ),
    }
    tensors, expected = {}, {}
    for template, place in prefixes.items():
        arrays = pair()
        for role in ("down", "up"):
            tensors[template.format(role)] = arrays[role].astype(np.float32)
        expected[place] = arrays
    write_safetensors(tensors, tmp_path / "lora.safetensors")
    weights = load_lora(tmp_path / "lora.safetensors")
    assert weights.scale == 1.0  # no alphas, no metadata: diffusers' scale
    for (component, path), arrays in expected.items():
        node = weights.components()[component]
        for key in path:
            node = node[key]
        np.testing.assert_array_equal(node[DOWN], arrays["down"].T.astype(np.float32))
        np.testing.assert_array_equal(node[UP], arrays["up"].T.astype(np.float32))


def test_convert_between_layouts(tmp_path):
    weights = example_weights()
    save_lora(tmp_path / "kohya.safetensors", weights, format="kohya")
    convert_lora(tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors", "diffusers")
    assert_same_adapters(load_lora(tmp_path / "diffusers.safetensors"), weights)


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.ckpt", "lora.safetensors"])
def test_pickles_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [0.0]}))
    with pytest.raises(PickleRefusedError, match=name):
        load_lora(tmp_path / name)


def test_directory_with_only_a_pickle_is_refused(tmp_path):
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(PickleRefusedError, match="pytorch_lora_weights.bin"):
        load_lora(tmp_path)


def test_file_of_no_lora_layout_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    write_safetensors({"down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4, 3, 3))}, path)
    with pytest.raises(ValueError, match="no layout") as error:
        load_lora(path)
    assert str(path) in one_line_error(error)


@pytest.mark.parametrize(
    "key",
    [
        "unet.down_blocks.0.resnets.0.conv1.dora_scale",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ],
)
def test_keys_that_cannot_be_placed_are_refused(tmp_path, key):
    path = tmp_path / "lora.safetensors"
    save_lora(path, example_weights())
    tensors, metadata = tensors_and_metadata(path)
    write_safetensors({**tensors, key: np.zeros((4, 4), np.float32)}, path, metadata)
    with pytest.raises(ValueError, match="cannot place") as error:
        load_lora(path)
    message = one_line_error(error)
    assert str(path) in message and key in message


def test_module_without_its_up_weight_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, example_weights(), format="kohya")
    tensors, _ = tensors_and_metadata(path)
    del tensors["lora_unet_time_embedding_linear_1.lora_up.weight"]
    write_safetensors(tensors, path)
    with pytest.raises(ValueError, match="time_embedding.linear_1 has no up weight"):
        load_lora(path)


def test_check_lora_accepts_the_model_and_refuses_another(tmp_path):
    weights = example_weights()
    unet, text_encoder = kernels_of(weights.unet), kernels_of(weights.text_encoder)
    check_lora(weights, unet, text_encoder)
    wider = kernels_of(weights.unet)
    wider["down_blocks_0"]["resnets_0"]["conv1"]["kernel"] = np.zeros((3, 3, 8, 32))
    with pytest.raises(WeightsMismatchError, match="another model") as error:
        check_lora(weights, wider, text_encoder)
    assert "down_blocks.0.resnets.0.conv1" in one_line_error(error)
    without = kernels_of(weights.text_encoder)
    del without["encoder"]["layers_0"]["mlp"]
    with pytest.raises(WeightsMismatchError, match="text_model.encoder.layers.0.mlp.fc1"):
        check_lora(weights, unet, without)
    with pytest.raises(WeightsMismatchError, match="no text_encoder params"):
        check_lora(weights, unet)
