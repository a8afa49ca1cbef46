"""`ldm-jax import` / `sample` / `train` / `export` on a whole (tiny, random) diffusers
LDMPipeline: an unconditional U-Net with plain attention on a VQ autoencoder."""

import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.diffusers import load_diffusers_unet
from ldm_jax.interop.safetensors_io import read_safetensors
from ldm_jax.models import UNet
from ldm_jax.pipeline.import_export import export_diffusers, export_workdir, import_model
from ldm_jax.pipeline.load import load_generator
from ldm_jax.train.run import train
from tests.conftest import load_config, run_cli
from tests.interop.test_diffusers import randomized

torch.set_num_threads(1)

LATENT_SIZE, IMAGE_SIZE, SCALING_FACTOR = 8, 16, 0.5


def ldm_pipeline() -> diffusers.LDMPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=LATENT_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vqvae = diffusers.VQModel(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=3,
        num_vq_embeddings=32,
        norm_num_groups=8,
        scaling_factor=SCALING_FACTOR,
    )
    # The CompVis LDMs' schedule (linear_start=0.0015, linear_end=0.0195).
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )
    return diffusers.LDMPipeline(
        vqvae=randomized(vqvae), unet=randomized(unet), scheduler=scheduler
    )


def pipeline_images(pipeline: diffusers.LDMPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=2, generator=generator, num_inference_steps=2, output_type="np")[0]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm") / "pipeline"
    pipeline = ldm_pipeline()
    pipeline.save_pretrained(path)
    return path, pipeline


@pytest.fixture(scope="module")
def workdir(pipeline_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("imported") / "run"
    result = run_cli("import", "--from=diffusers", str(pipeline_dir[0]), f"--workdir={path}")
    assert result.returncode == 0, result.stderr
    assert f"ldm-jax sample --workdir={path} --num_per_prompt=4`" in result.stdout
    return path


def test_import_writes_an_unconditional_vq_workdir(workdir):
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "diffusion"
    assert config["diffusion"]["conditioning"] == "none"
    assert config["diffusion"]["unet"]["attention_type"] == "plain"
    assert config["diffusion"]["unet"]["attention_head_dim"] == 8
    assert config["diffusion"]["schedule"] == "scaled_linear"
    assert config["autoencoder"]["kind"] == "vq"
    assert config["autoencoder"]["model"]["num_embeddings"] == 32
    assert config["autoencoder"]["pretrained"] == "vqvae"
    assert config["data"]["image_size"] == IMAGE_SIZE
    index = json.loads((workdir / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_imported_workdir_predicts_and_decodes_as_the_pipeline(pipeline_dir, workdir):
    _, reference = pipeline_dir
    generator = load_generator(str(workdir))
    model, params = generator.model, generator.params
    assert model.latent_scale == SCALING_FACTOR
    latents = np.random.default_rng(0).standard_normal((2, LATENT_SIZE, LATENT_SIZE, 3))
    latents = latents.astype(np.float32)
    denoise = model.denoiser(params, generator.conditions([""] * 2), guidance_scale=1.0)
    eps = np.asarray(jax.jit(denoise)(jnp.asarray(latents), jnp.full((2,), 500, jnp.int32)))
    decoded = model.autoencoder.apply(
        {"params": params["autoencoder"]}, latents / model.latent_scale, method="decode"
    )
    with torch.no_grad():
        sample = torch.from_numpy(latents).permute(0, 3, 1, 2)
        expected_eps = reference.unet(sample, 500).sample.permute(0, 2, 3, 1).numpy()
        # What LDMPipeline does with its final latents.
        expected = reference.vqvae.decode(sample / reference.vqvae.config.scaling_factor).sample
    diffs = (
        float(np.max(np.abs(eps - expected_eps))),
        float(np.max(np.abs(np.asarray(decoded) - expected.permute(0, 2, 3, 1).numpy()))),
    )
    print(f"LDMPipeline: max abs diff U-Net {diffs[0]:.2e}, decoded {diffs[1]:.2e}")
    assert max(diffs) <= 1e-4


def test_sample_draws_from_the_unconditional_workdir(workdir, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli(
        "sample", f"--workdir={workdir}", "--num_per_prompt=4", "--steps=2", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 samples" in result.stdout
    width, height = Image.open(out).size  # one row of 4, with the grid's padding
    assert 4 * IMAGE_SIZE <= width < 5 * IMAGE_SIZE and IMAGE_SIZE <= height < 2 * IMAGE_SIZE


def test_export_writes_an_ldm_pipeline_diffusers_runs_identically(pipeline_dir, workdir, tmp_path):
    _, reference = pipeline_dir
    out = tmp_path / "exported"
    result = run_cli("export", f"--workdir={workdir}", "--to=diffusers", f"--out={out}")
    assert result.returncode == 0, result.stderr
    reloaded = diffusers.LDMPipeline.from_pretrained(out)
    assert isinstance(reloaded.unet, diffusers.UNet2DModel)
    assert isinstance(reloaded.vqvae, diffusers.VQModel)
    for name in ("unet", "vqvae"):
        theirs = getattr(reference, name).state_dict()
        ours = getattr(reloaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert reloaded.vqvae.config.scaling_factor == SCALING_FACTOR
    assert reloaded.scheduler.config.beta_start == 0.0015
    np.testing.assert_array_equal(pipeline_images(reloaded), pipeline_images(reference))


def test_safetensors_export_of_a_vq_workdir_writes_compvis_names(workdir, tmp_path):
    out = tmp_path / "model.safetensors"
    export_workdir(str(workdir), "safetensors", str(out))
    tensors = read_safetensors(str(out))
    assert tensors["first_stage_model.quantize.embedding.weight"].shape == (32, 3)
    assert tensors["model.diffusion_model.input_blocks.3.1.qkv.weight"].shape == (96, 32, 1)
    # CompVis' readers assume no rescaling of VQ latents; this model's scale is kept.
    assert np.asarray(tensors["scale_factor"]).item() == SCALING_FACTOR


def test_imported_workdir_fine_tunes_from_its_weights(workdir, tmp_path):
    """`ldm-jax train --config=configs/workdir.py:DIR` on images, no captions or labels."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = load_config("workdir", str(run))
    config.data.source, config.data.path = "image_folder", str(images)
    config.diffusion.train.update(steps=1, batch_size=8, learning_rate=1e-4, warmup_steps=1)
    config.train.sample_every = 0
    assert train(config, str(run))

    generator = load_generator(str(run))
    tuned = jax.tree.leaves(jax.device_get(generator.params["unet"]))
    imported = jax.tree.leaves(load_diffusers_unet(str(workdir / "unet")).params)
    changes = [np.max(np.abs(a - b)) for a, b in zip(tuned, imported, strict=True)]
    assert 0 < max(changes) < 1e-3


def test_a_hub_ldm_without_a_scaling_factor_imports_unscaled(pipeline_dir, tmp_path):
    """The hub's CompVis LDMs predate `scaling_factor`: their latents are unscaled."""
    source = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir[0], source)
    config_path = source / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    del config["scaling_factor"]
    config_path.write_text(json.dumps(config))
    import_model("diffusers", str(source), str(tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "vqvae" / "config.json").read_text())
    assert written["scaling_factor"] == 1.0


def test_vq_models_diffusers_ldm_pipeline_cannot_run_are_refused(pipeline_dir, tmp_path):
    from ldm_jax.interop.pipeline import load_diffusers_pipeline

    components = load_diffusers_pipeline(str(pipeline_dir[0]))
    unet, vqvae = components["unet"], components["vae"]
    classes = unet.module.clone(num_classes=3)
    transformer = UNet(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        norm_num_groups=8,
    )
    for module, reason in (
        (classes, "unconditional.*class labels"),
        (transformer, "whose unet is a UNet2DModel"),
    ):
        with pytest.raises(ValueError, match=reason):
            export_diffusers(
                {"unet": ImportedModel(module, unet.params), "vae": vqvae}, str(tmp_path / "out")
            )
    assert not (tmp_path / "out").exists()
