"""Import and export work on a bucket as on a disk: a diffusers pipeline (U-Net, autoencoder,
CLIP text encoder and tokenizer) written to and read back from ``gs://``, an image folder and
an image input read from it, and pickles in it refused; against a local GCS emulator."""

import json
import pickle

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import emulated_bucket
from PIL import Image
from tokenizers import pre_tokenizers

from ldm_jax import storage
from ldm_jax.data.clip_tokenizer import ClipTokenizer
from ldm_jax.data.image_folder import ImageFolderSource
from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.diffusers import load_diffusers_unet
from ldm_jax.interop.pipeline import load_diffusers_pipeline, save_diffusers_pipeline
from ldm_jax.interop.safetensors_io import PickleRefusedError, read_safetensors
from ldm_jax.models import AutoencoderKL, UNet
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.pipeline.image_inputs import read_image

TEXT_WIDTH = 16
SCHEDULE = dict(
    schedule="scaled_linear",
    num_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v",
    timestep_spacing="trailing",
    steps_offset=1,
    set_alpha_to_one=False,
)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A bucket in a GCS emulator run for this module (see ``tests/gcs_emulator.py``)."""
    with emulated_bucket(tmp_path_factory.mktemp("emulator")) as url:
        yield url


def _random_params(module: nn.Module, *inputs, rngs=None) -> dict:
    """Normal random float32 parameters of `module` (shapes traced, nothing compiled)."""
    abstract = jax.eval_shape(module.init, rngs or jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), nn.meta.unbox(abstract)
    )


def _assert_same_params(loaded, saved) -> None:
    loaded = flax.traverse_util.flatten_dict(loaded)
    saved = flax.traverse_util.flatten_dict(saved)
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=str(name))


def _write_tokenizer(directory) -> None:
    """CLIP tokenizer files with a byte-level vocabulary and no merges."""
    byte_pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*byte_pieces, *(p + "</w>" for p in byte_pieces), "<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def test_a_pipeline_round_trips_through_a_bucket(bucket, tmp_path):
    unet = UNet(
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(True, False),
        num_attention_heads=2,
        context_dim=TEXT_WIDTH,
        norm_num_groups=8,
    )
    unet_params = _random_params(
        unet, jnp.zeros((1, 2, 2, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, TEXT_WIDTH))
    )
    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4)
    key = jax.random.key(0)
    vae_params = _random_params(vae, jnp.zeros((1, 2, 2, 3)), rngs={"params": key, "sample": key})
    text = CLIPTextTransformer(
        vocab_size=514, max_length=8, width=TEXT_WIDTH, num_layers=1, num_heads=2, mlp_width=32
    )
    text_params = _random_params(text, jnp.zeros((1, 8), jnp.int32))
    _write_tokenizer(tmp_path / "tokenizer")

    out_dir = f"{bucket}/pipeline"
    save_diffusers_pipeline(
        out_dir,
        unet=ImportedModel(unet, unet_params, {"sample_size": 2}),
        vae=ImportedModel(vae, vae_params, {"scaling_factor": 0.5}),
        schedule=SCHEDULE,
        text_encoder=ImportedModel(text, text_params),
        tokenizer=str(tmp_path / "tokenizer"),
    )
    loaded = load_diffusers_pipeline(out_dir)

    _assert_same_params(loaded["unet"].params, unet_params)
    _assert_same_params(loaded["vae"].params, vae_params)
    _assert_same_params(loaded["text_encoder"].params, text_params)
    assert loaded["vae"].extras["scaling_factor"] == 0.5
    assert loaded["schedule"] == SCHEDULE and loaded["sample_size"] == 2
    assert loaded["tokenizer"] == f"{out_dir}/tokenizer"
    # The text encoder finds the sibling tokenizer/ in the bucket, as on a disk.
    assert loaded["text_encoder"].extras["tokenizer_dir"] == f"{out_dir}/tokenizer"
    texts = ["a photo of a cat", ""]
    expected = ClipTokenizer.from_directory(tmp_path / "tokenizer", max_length=8)(texts)
    np.testing.assert_array_equal(loaded["text_encoder"].extras["tokenizer"](texts), expected)
    remote_tokenizer = ClipTokenizer.from_directory(loaded["tokenizer"], max_length=8)
    np.testing.assert_array_equal(remote_tokenizer(texts), expected)


def test_an_image_folder_and_an_image_input_in_a_bucket(bucket, tmp_path):
    local = tmp_path / "images"
    (local / "cats").mkdir(parents=True)
    (local / "dogs" / "deep").mkdir(parents=True)
    Image.new("RGB", (8, 6), (200, 10, 10)).save(local / "cats" / "a.png")
    (local / "cats" / "a.txt").write_text("a red cat\n")
    Image.new("L", (4, 4), 90).save(local / "dogs" / "deep" / "b.jpg")
    Image.new("RGB", (2, 2), (0, 0, 255)).save(local / "c.png")
    (local / "dogs" / "broken.png").write_bytes(b"not an image")
    (local / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "blue"}))
    storage.upload(local, f"{bucket}/images")

    source = pickle.loads(pickle.dumps(ImageFolderSource(f"{bucket}/images")))

    assert len(source) == 3 and source.num_unreadable == 1
    assert source.class_names == ["cats", "dogs"]
    records = [source[index] for index in range(len(source))]  # c, cats/a, dogs/deep/b
    assert [int(record["label"]) for record in records] == [-1, 0, 1]
    assert [record["caption"] for record in records] == ["blue", "a red cat", ""]
    assert (records[1]["image"] == (200, 10, 10)).all() and records[1]["image"].shape == (6, 8, 3)
    assert abs(int(records[2]["image"].mean()) - 90) <= 1  # grey JPEG expanded to RGB
    image = read_image(f"{bucket}/images/c.png", "--init_image", "img2img")
    assert image.shape == (2, 2, 3) and (image == (0, 0, 255)).all()
    with pytest.raises(FileNotFoundError, match=f"'{bucket}/nowhere' does not exist"):
        ImageFolderSource(f"{bucket}/nowhere")
    with pytest.raises(ValueError, match=f"--init_image={bucket}/images/dogs/broken.png cannot"):
        read_image(f"{bucket}/images/dogs/broken.png", "--init_image", "img2img")


def test_pickles_and_missing_folders_in_a_bucket_are_named(bucket):
    unet_dir = storage.as_path(f"{bucket}/pickled/unet")
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "config.json").write_text("{}")
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    (unet_dir / "disguised.safetensors").write_bytes(pickle.dumps({"w": 1}, protocol=2))

    with pytest.raises(PickleRefusedError, match=f"{unet_dir}/diffusion_pytorch_model.bin is a"):
        load_diffusers_unet(f"{bucket}/pickled/unet")
    with pytest.raises(PickleRefusedError, match="disguised.safetensors is a pickled checkpoint"):
        read_safetensors(f"{bucket}/pickled/unet/disguised.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nowhere is not a directory"):
        load_diffusers_unet(f"{bucket}/nowhere")
