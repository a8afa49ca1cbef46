"""`ldm-jax import` / `export` on a whole (tiny, random) Stable Diffusion pipeline."""

import json
import shutil
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ldm_jax.interop import single_file
from ldm_jax.interop.diffusers import load_diffusers_unet
from ldm_jax.pipeline.import_export import export_workdir, import_model
from ldm_jax.pipeline.load import load_generator
from ldm_jax.train.run import train
from tests.conftest import load_config
from tests.interop.test_clip_interop import write_byte_level_tokenizer

WIDTH = 32
PROMPTS = ["a red circle", "a blue square at the top left"]


def _perturbed(model):
    """Random weights everywhere, so that no zero-initialised layer hides a mistake."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A StableDiffusionPipeline of tiny random modules, saved as diffusers saves one."""
    root = tmp_path_factory.mktemp("sd")
    write_byte_level_tokenizer(root / "tokenizer_files")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_files")
    text_encoder = _perturbed(
        transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=WIDTH,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    )
    unet = _perturbed(
        diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=WIDTH,
            attention_head_dim=4,
            norm_num_groups=32,  # single files do not store it: Stable Diffusion's 32
        )
    )
    vae = _perturbed(
        diffusers.AutoencoderKL(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=16,
            scaling_factor=0.5,
        )
    )
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "pipeline")
    return root / "pipeline", pipeline


@pytest.fixture(scope="module")
def workdir(pipeline_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("imported") / "run"
    import_model("diffusers", str(pipeline_dir[0]), str(path))
    return path


def test_import_writes_a_config_describing_the_pipeline(workdir):
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "diffusion"
    assert config["diffusion"]["text_encoder"]["kind"] == "clip"
    assert config["diffusion"]["unet"]["block_out_channels"] == [32, 64]
    assert config["diffusion"]["unet"]["attention_levels"] == [True, False]
    assert config["autoencoder"]["model"]["block_out_channels"] == [32, 64]
    assert config["data"]["image_size"] == 16  # 8 latents x f=2
    assert config["sample"]["steps_offset"] == 1
    assert config["sample"]["set_alpha_to_one"] is False


def test_imported_workdir_predicts_as_the_diffusers_pipeline(pipeline_dir, workdir):
    """Tokenizer, CLIP, guidance and U-Net together: one guided prediction, both ways."""
    _, reference = pipeline_dir
    generator = load_generator(str(workdir))
    model, params = generator.model, generator.params
    tokens = generator.conditions(PROMPTS)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = jnp.full((2,), 500, jnp.int32)
    denoise = model.denoiser(params, jnp.asarray(tokens), guidance_scale=7.5)
    ours = np.asarray(jax.jit(denoise)(jnp.asarray(latents), t))

    with torch.no_grad():
        ids = reference.tokenizer(
            PROMPTS + ["", ""], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        np.testing.assert_array_equal(ids[:2].numpy(), tokens)
        context = reference.text_encoder(ids)[0]
        sample = torch.from_numpy(latents).permute(0, 3, 1, 2).repeat(2, 1, 1, 1)
        eps = reference.unet(sample, 500, encoder_hidden_states=context).sample
        conditional, unconditional = eps.chunk(2)
        guided = unconditional + 7.5 * (conditional - unconditional)
    np.testing.assert_allclose(ours, guided.permute(0, 2, 3, 1).numpy(), atol=5e-4)

    images = generator(tokens, seed=0, num_steps=2, guidance_scale=7.5)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_export_to_diffusers_round_trips_every_weight(pipeline_dir, workdir, tmp_path):
    _, reference = pipeline_dir
    out = tmp_path / "exported"
    export_workdir(str(workdir), "diffusers", str(out))
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(reference, name).state_dict()
        ours = getattr(reloaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert reloaded.vae.config.scaling_factor == 0.5
    assert reloaded.scheduler.config.steps_offset == 1


def test_export_to_one_safetensors_file_loads_back(workdir, tmp_path):
    out = tmp_path / "model.safetensors"
    export_workdir(str(workdir), "safetensors", str(out))
    # A single file stores no head counts; these tiny models have 4 of 8 wide.
    components = single_file.load_single_file(str(out), num_heads=4, text_encoder_heads=4)
    generator = load_generator(str(workdir))
    for name, ours in (("unet", "unet"), ("vae", "autoencoder")):
        flat = jax.tree.leaves(components[name].params)
        expected = jax.tree.leaves(jax.device_get(generator.params[ours]))
        assert len(flat) == len(expected)
        for a, b in zip(flat, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_cli_refuses_a_pickle_with_the_conversion_command(tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm_jax.cli",
            "import",
            "--from=single-file",
            str(pickled),
            f"--workdir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "safetensors" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_imported_workdir_fine_tunes_from_its_weights(workdir, tmp_path):
    """`ldm-jax train --config=configs/workdir.py:DIR` starts stage 2 from the imported U-Net."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red circle")
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = load_config("workdir", str(run))
    config.data.source, config.data.path = "image_folder", str(images)
    config.diffusion.train.update(steps=1, batch_size=8, learning_rate=1e-4, warmup_steps=1)
    config.train.sample_every = 0
    config.sample.update(num_per_prompt=2, num_steps=2)
    assert train(config, str(run))

    generator = load_generator(str(run))
    tuned = jax.tree.leaves(jax.device_get(generator.params["unet"]))
    imported = jax.tree.leaves(load_diffusers_unet(str(workdir / "unet")).params)
    changes = [np.max(np.abs(a - b)) for a, b in zip(tuned, imported, strict=True)]
    # One small AdamW step away from the imported weights (a fresh init would be far off).
    assert 0 < max(changes) < 1e-3
