"""Image-to-image, inpainting, outpainting and super-resolution on tiny random models."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import load_config, run_cli
from PIL import Image

from ldm_jax.config import base_config
from ldm_jax.data import degradation, masks, shapes, tokenizer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders, image_inputs
from ldm_jax.pipeline.generator import Generator, sampling_options
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import diffusion as diffusion_stage
from ldm_jax.train.state import make_optimizer

RULES = mesh_lib.DEFAULT_AXIS_RULES
OPTIONS = sampling_options(base_config().sample, sampler="ddim", num_steps=4, guidance_scale=2.0)
NUM = 8


def _images(n, split="validation"):
    source = shapes.ShapesSource(split, image_size=32)
    return np.stack([source[i]["image"] for i in range(n)])


@functools.cache
def _setup(name):
    config = load_config(name, "tiny")
    tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
    model = builders.build_model(config, tok, latent_scale=0.8)
    mesh = mesh_lib.create_mesh(data=-1, fsdp=1, tensor=1)
    init_fn = functools.partial(
        diffusion_stage.init_state,
        model=model,
        optimizer=make_optimizer(config.diffusion.train),
        max_caption_length=config.data.max_caption_length,
    )
    state, shardings = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    ae_init, _ = autoencoder_stage.stage_functions(config)
    ae_state, ae_shardings = sharding.create_sharded(ae_init, mesh, RULES, jax.random.key(1))
    frozen = {"autoencoder": ae_state.params["autoencoder"]}
    generator = Generator(
        model,
        {**state.params, **frozen},
        mesh,
        config.sample,
        tokenizer=tok,
        max_caption_length=config.data.max_caption_length,
        batch_size=NUM,
    )
    return config, model, generator, (state, shardings, frozen, ae_shardings)


def _conditions(generator):
    return generator.conditions(["a red circle"] * NUM, [0] * NUM)


def test_img2img_strength_one_is_txt2img_and_zero_the_reconstruction():
    _, model, generator, _ = _setup("quickstart")
    conditions, images = _conditions(generator), {"image": _images(NUM)}
    txt2img = generator(conditions, seed=3, options=OPTIONS)
    img2img = dataclasses.replace(OPTIONS, mode="img2img")
    full = generator(conditions, 3, dataclasses.replace(img2img, strength=1.0), images)
    np.testing.assert_array_equal(full, txt2img)
    kept = generator(conditions, 3, dataclasses.replace(img2img, strength=0.0), images)
    latents = model.encode(generator.params, images["image"] / 127.5 - 1.0)
    decoded = model.autoencoder.apply(
        {"params": generator.params["autoencoder"]}, latents / model.latent_scale, method="decode"
    )
    reconstruction = np.clip(np.round((np.asarray(decoded) + 1) * 127.5), 0, 255)
    assert np.abs(kept.astype(int) - reconstruction).max() <= 1
    partial = generator(conditions, 3, dataclasses.replace(img2img, strength=0.5), images)
    assert not np.array_equal(partial, kept) and not np.array_equal(partial, txt2img)


def test_training_free_inpainting_keeps_far_pixels_and_outpainting_extends_the_canvas():
    _, _, generator, _ = _setup("quickstart")
    conditions = _conditions(generator)
    image = _images(NUM)
    mask = np.zeros((NUM, 32, 32, 1), np.uint8)
    mask[:, 8:16, 8:16] = 1
    inpaint = dataclasses.replace(OPTIONS, mode="inpaint")
    pasted = generator(conditions, 3, inpaint, {"image": image, "mask": mask})
    # By default the input's own pixels are kept outside the mask, exactly.
    outside = np.broadcast_to(mask == 0, image.shape)
    np.testing.assert_array_equal(pasted[outside], image[outside])
    assert not np.array_equal(pasted[~outside], image[~outside])
    # Without the paste, pixels two latents (8 pixels) from the mask see the same latents:
    # nearly unchanged.
    inpaint = dataclasses.replace(inpaint, paste_back=False)
    kept = generator(conditions, 3, inpaint, {"image": image, "mask": np.zeros_like(mask)})
    filled = generator(conditions, 3, inpaint, {"image": image, "mask": mask})
    np.testing.assert_array_equal(filled[~outside], pasted[~outside])
    far = np.asarray(filled[:, 24:, 24:], int) - kept[:, 24:, 24:]
    assert (
        np.abs(far).mean()
        < np.abs(np.asarray(filled[:, 8:16, 8:16], int) - kept[:, 8:16, 8:16]).mean()
    )
    canvas, canvas_mask = masks.outpaint_canvas(image[0], 8, 0, 0, 0)
    assert canvas.shape == (32, 40, 3) and canvas_mask[:, :8].all() and not canvas_mask[:, 8:].any()
    wide = generator(
        conditions,
        3,
        inpaint,
        {"image": np.repeat(canvas[None], NUM, 0), "mask": np.repeat(canvas_mask[None], NUM, 0)},
    )
    assert wide.shape == (NUM, 32, 40, 3)


def test_inpainting_model_concatenates_masked_latents_and_mask_and_trains():
    config, model, generator, (state, shardings, frozen, ae_shardings) = _setup("inpaint")
    assert model.unet.in_channels == 2 * config.autoencoder.model.latent_channels + 1
    rng = np.random.default_rng(0)
    batch = {
        "image": _images(16, "train"),
        "tokens": _conditions(generator)[:1].repeat(16, 0),
        "mask": np.stack([masks.random_mask(rng, 32) for _ in range(16)]),
    }
    optimizer = make_optimizer(config.diffusion.train)
    step = functools.partial(
        diffusion_stage.train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=0.99,
        cond_drop_prob=0.1,
        min_snr_gamma=None,
    )
    _, metrics = jax.jit(step)(state, batch, jax.random.key(2), frozen)
    assert np.isfinite(float(metrics["loss"]))
    image, mask = _images(NUM), np.ones((NUM, 32, 32, 1), np.uint8)
    out = generator(
        _conditions(generator),
        3,
        dataclasses.replace(OPTIONS, mode="inpaint"),
        {"image": image, "mask": mask},
    )
    assert out.shape == (NUM, 32, 32, 3)
    assert generator(_conditions(generator), 3, OPTIONS).shape == (NUM, 32, 32, 3)


def test_random_masks_cover_boxes_strokes_and_whole_images():
    rng = np.random.default_rng(0)
    drawn = [masks.random_mask(rng, 32) for _ in range(200)]
    assert all(m.shape == (32, 32, 1) and m.dtype == np.uint8 and m.any() for m in drawn)
    full = np.mean([m.all() for m in drawn])
    assert 0.15 < full < 0.35
    assert len({m.tobytes() for m in drawn}) > 100


def test_super_resolution_model_upsamples_four_times_and_refuses_other_modes():
    config, model, generator, _ = _setup("superres")
    assert model.unet.in_channels == config.autoencoder.model.latent_channels + 3
    low_res = np.stack([degradation.downsample(image, 4) for image in _images(NUM)])
    assert low_res.shape == (NUM, 8, 8, 3)
    conditions = generator.conditions([""] * NUM)
    sr = dataclasses.replace(OPTIONS, mode="sr", guidance_scale=1.0)
    assert generator(conditions, 0, sr, {"low_res": low_res}).shape == (NUM, 32, 32, 3)
    with pytest.raises(ValueError, match="super-resolution model: use --mode=sr"):
        generator(conditions, 0, OPTIONS)
    _, _, text_generator, _ = _setup("quickstart")
    with pytest.raises(ValueError, match="--mode=sr needs a model trained for super-resolution"):
        text_generator(_conditions(text_generator), 0, sr, {"low_res": low_res})


def test_bad_inputs_are_one_line_errors(tmp_path):
    _, _, generator, _ = _setup("quickstart")
    image = _images(NUM)
    inpaint = dataclasses.replace(OPTIONS, mode="inpaint")
    with pytest.raises(ValueError, match="--mask is 16x16 pixels but --init_image 32x32"):
        generator(
            _conditions(generator), 0, inpaint, {"image": image, "mask": image[:, :16, :16, :1]}
        )
    with pytest.raises(ValueError, match=r"--strength=1.5 must be in \[0, 1\]"):
        generator(_conditions(generator), 0, dataclasses.replace(inpaint, strength=1.5), {})
    with pytest.raises(ValueError, match="--mode=inpaint needs --init_image and --mask"):
        generator(_conditions(generator), 0, inpaint, {})
    with pytest.raises(ValueError, match="--mode=img2img needs --init_image=PNG"):
        image_inputs.mode_inputs("img2img", None, None, None)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="--init_image=.*bad.png cannot be read as an image"):
        image_inputs.mode_inputs("img2img", str(tmp_path / "bad.png"), None, None)
    with pytest.raises(ValueError, match="--mask is not used by --mode=img2img"):
        image_inputs.mode_inputs("img2img", str(tmp_path / "bad.png"), "m.png", None)
    with pytest.raises(ValueError, match="--outpaint=-3 must be PIXELS"):
        image_inputs.parse_outpaint("-3")
    assert image_inputs.parse_outpaint("8") == (8, 8, 8, 8)
    assert image_inputs.parse_outpaint("0,8,0,0") == (0, 8, 0, 0)
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[4:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(image[0]).save(tmp_path / "image.png")
    mode, inputs = image_inputs.mode_inputs(
        "inpaint", str(tmp_path / "image.png"), str(tmp_path / "mask.png"), None
    )
    assert mode == "inpaint" and inputs["mask"][4:8].all() and not inputs["mask"][8:].any()


def test_sample_without_init_image_is_one_line(tmp_path):
    result = run_cli("sample", f"--workdir={tmp_path}", "--mode=inpaint", timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "--mode=inpaint needs --init_image=PNG" in result.stderr, result.stderr


@pytest.mark.slow
def test_super_resolution_train_and_sample_end_to_end(tmp_path):
    workdir = tmp_path / "sr"
    result = run_cli("train", "--config=configs/superres.py:tiny", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    Image.fromarray(degradation.downsample(_images(1)[0], 4)).save(tmp_path / "low.png")
    out = tmp_path / "sr.png"
    result = run_cli(
        "sample",
        f"--workdir={workdir}",
        "--mode=sr",
        f"--init_image={tmp_path / 'low.png'}",
        "--num_per_prompt=2",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(out)).shape == (2 + 34, 2 + 2 * 34, 3)
    result = run_cli("sample", f"--workdir={workdir}", "--num_per_prompt=1")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "use --mode=sr" in result.stderr
