"""The ``ldm-jax`` command line: flags, dispatch, and one clear line for a user's mistake.

ldm-jax train    --config=configs/quickstart.py --workdir=DIR [--config.KEY=VALUE ...]
ldm-jax sample   --workdir=DIR --prompt="a red circle" | --label=N  [--num --sampler --steps
                 --guidance --eta --seed --out]
ldm-jax evaluate --workdir=DIR [--what=samples|reconstruction] [--num_per_prompt --sampler
                 --steps --guidance --seed | --num_images --lpips_weights]
ldm-jax cache-latents --workdir=STAGE1_DIR --out=DIR [--split=NAME]
ldm-jax import   --from=diffusers|single-file|clip PATH --workdir=DIR [--tokenizer=DIR]
ldm-jax export   --workdir=DIR --to=diffusers|safetensors --out=PATH [--raw]
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.diffusion import SAMPLERS
from ldm_jax.interop.formats import EXPORT_FORMATS, IMPORT_FORMATS

COMMANDS = ("train", "sample", "evaluate", "cache-latents", "import", "export")
# Commands that take one positional argument (the path to import).
_POSITIONAL = {"import": "PATH"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file, e.g. configs/quickstart.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, metrics, samples)."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt (repeatable) for `sample`.")
_LABEL = flags.DEFINE_multi_integer("label", None, "Class label (repeatable) for `sample`.")
_NUM = flags.DEFINE_integer("num", 16, "Images per prompt or label for `sample`.")
_NUM_PER_PROMPT = flags.DEFINE_integer(
    "num_per_prompt", 8, "Samples per colour x shape prompt for `evaluate`."
)
_SAMPLER = flags.DEFINE_enum(
    "sampler", None, list(SAMPLERS), "Sampler (default: the config's sample.sampler)."
)
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = none).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_OUT = flags.DEFINE_string("out", None, "Output PNG (sample) or folder (evaluate).")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Stage-2 checkpoint step to sample from (default: newest)."
)
_FROM = flags.DEFINE_enum("from", None, list(IMPORT_FORMATS), "Format of the PATH to `import`.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "`import --from=single-file`: folder with the CLIP vocab.json/merges.txt."
)
_PREDICTION_TYPE = flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v", "x0"],
    "`import --from=single-file`: what the U-Net predicts (v for Stable Diffusion 2 768-v).",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "`import --from=single-file`: the model's image side in pixels (default: 256 for CompVis "
    "LDMs, 768 for v-prediction, else 512).",
)
_TO = flags.DEFINE_enum("to", None, list(EXPORT_FORMATS), "Format to `export` to.")
_RAW = flags.DEFINE_bool("raw", False, "`export` the online params instead of their EMA.")
_WHAT = flags.DEFINE_enum(
    "what",
    "samples",
    ["samples", "reconstruction"],
    "`evaluate`: stage-2 samples, or stage-1 reconstructions (PSNR, SSIM, LPIPS).",
)
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 1024, "`evaluate --what=reconstruction`: validation images to reconstruct."
)
_LPIPS_WEIGHTS = flags.DEFINE_string(
    "lpips_weights",
    None,
    "`evaluate --what=reconstruction`: LPIPS safetensors (default: the config's "
    "autoencoder.loss.lpips_weights; none: no LPIPS).",
)
_SPLIT = flags.DEFINE_string(
    "split", None, "`cache-latents`: the split to encode (default: config data.train_split)."
)


def _require_workdir() -> str:
    """The --workdir; its ``xla_cache/`` becomes the persistent compilation cache unless one
    is set already (JAX_COMPILATION_CACHE_DIR), so a restart or a later `sample` skips
    recompiling."""
    if not _WORKDIR.value:
        raise ValueError("--workdir is required")
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "xla_cache"))
    return _WORKDIR.value


def _sampling_mesh():
    from ldm_jax.parallel import mesh as mesh_lib

    return mesh_lib.create_mesh(data=-1, fsdp=1, tensor=1)


def _options(config):
    from ldm_jax.train.diffusion import sampling_options

    return sampling_options(
        config,
        sampler=_SAMPLER.value,
        num_steps=_STEPS.value,
        guidance_scale=_GUIDANCE.value,
        eta=_ETA.value,
    )


def _train() -> None:
    from ldm_jax.train.run import train

    if _CONFIG.value is None:
        raise ValueError("--config is required, e.g. --config=configs/quickstart.py")
    workdir = _require_workdir()
    # Preemption (TPU maintenance, SLURM, Ctrl-C): finish the step, checkpoint, exit cleanly.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if not train(_CONFIG.value, workdir, should_stop=lambda _: stop.is_set()):
        print(f"stopped early; checkpointed in {workdir}; run the same command to resume")


def _sample() -> None:
    from ldm_jax.evaluate.grid import save_grid
    from ldm_jax.train.diffusion import load_generator

    workdir = _require_workdir()
    if _NUM.value < 1:
        raise ValueError(f"--num={_NUM.value} must be at least 1")
    generator, config = load_generator(workdir, _sampling_mesh(), step=_CHECKPOINT_STEP.value)
    prompts = [p for p in (_PROMPT.value or []) for _ in range(_NUM.value)] or None
    labels = [n for n in (_LABEL.value or []) for _ in range(_NUM.value)] or None
    if config.diffusion.conditioning == "none":
        prompts = [""] * _NUM.value
    images = generator(
        generator.conditions(prompts, labels), seed=_SEED.value, options=_options(config)
    )
    out = _OUT.value or os.path.join(
        workdir, "samples", f"sample_{time.strftime('%Y%m%d_%H%M%S')}.png"
    )
    save_grid(images, out, columns=_NUM.value if _NUM.value <= 16 else None)
    print(f"wrote {len(images)} samples to {out}")


def _evaluate() -> None:
    if _WHAT.value == "reconstruction":
        return _evaluate_reconstruction()
    from ldm_jax.evaluate.samples import evaluate_samples
    from ldm_jax.train.diffusion import load_generator

    workdir = _require_workdir()
    generator, config = load_generator(workdir, _sampling_mesh(), step=_CHECKPOINT_STEP.value)
    options = _options(config)
    name = f"{options.sampler}_{options.num_steps}steps_guidance{options.guidance_scale:g}"
    out = _OUT.value or os.path.join(workdir, "eval", name)
    results = evaluate_samples(
        generator, out, num_per_prompt=_NUM_PER_PROMPT.value, seed=_SEED.value, options=options
    )
    summary = {k: results[k] for k in ("colour_accuracy", "shape_accuracy", "both_accuracy")}
    print(json.dumps(summary))
    print(f"wrote {os.path.join(out, 'results.json')}")


def _evaluate_reconstruction() -> None:
    from ldm_jax.evaluate.first_stage import evaluate_workdir

    workdir = _require_workdir()
    if _NUM_IMAGES.value < 1:
        raise ValueError(f"--num_images={_NUM_IMAGES.value} must be at least 1")
    out = _OUT.value or os.path.join(workdir, "eval", "reconstruction")
    results = evaluate_workdir(
        workdir,
        _sampling_mesh(),
        out,
        num_images=_NUM_IMAGES.value,
        lpips_weights=_LPIPS_WEIGHTS.value,
    )
    print(json.dumps(results))
    print(f"wrote {out}")


def _cache_latents() -> None:
    from ldm_jax.train.latent_cache import cache_latents_of_workdir

    workdir = _require_workdir()
    if not _OUT.value:
        raise ValueError("--out is required: the directory to write the latent cache to")
    metadata = cache_latents_of_workdir(workdir, _OUT.value, split=_SPLIT.value)
    print(
        f"wrote {metadata['num_records']} latents of shape {tuple(metadata['latent_shape'])} "
        f"to {_OUT.value}; train stage 2 on them with --config.data.latent_cache={_OUT.value}"
    )


def _import(path: str) -> None:
    from ldm_jax.interop.workdir import import_model

    if _FROM.value is None:
        raise ValueError(f"--from is required: one of {IMPORT_FORMATS}")
    if not _WORKDIR.value:
        raise ValueError("--workdir is required: the new workdir to write")
    print(
        import_model(
            _FROM.value,
            path,
            _WORKDIR.value,
            tokenizer=_TOKENIZER.value,
            prediction_type=_PREDICTION_TYPE.value,
            image_size=_IMAGE_SIZE.value,
        )
    )


def _export() -> None:
    from ldm_jax.interop.workdir import export_workdir

    workdir = _require_workdir()
    if _TO.value is None or not _OUT.value:
        raise ValueError(f"--to (one of {EXPORT_FORMATS}) and --out are required")
    print(export_workdir(workdir, _TO.value, _OUT.value, raw=_RAW.value))


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) > 1 else None
    positional = argv[2:]
    if command not in COMMANDS or len(positional) != (command in _POSITIONAL):
        usage = f"ldm-jax {{{'|'.join(COMMANDS)}}} [--flags]; import takes one PATH"
        print(f"usage: {usage}; got {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from ldm_jax.config import ConfigError

    commands = {
        "train": _train,
        "sample": _sample,
        "evaluate": _evaluate,
        "cache-latents": _cache_latents,
        "import": lambda: _import(positional[0]),
        "export": _export,
    }
    try:
        commands[command]()
    except (ConfigError, OSError, ValueError, FloatingPointError) as error:
        message = " ".join(str(error).split())
        print(f"ldm-jax {command}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _configure_logging() -> None:
    """Our progress messages at INFO; the libraries' (orbax, absl, jax) only from WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    package_logger = logging.getLogger("ldm_jax")
    package_logger.setLevel(logging.INFO)
    package_logger.addHandler(handler)
    package_logger.propagate = False


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        parsed = flags.FLAGS(argv)
    except flags.Error as error:
        print(f"ldm-jax: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections raises these for an override of a key the config does not have,
        # or a value of the wrong type.
        overrides = [a for a in argv if a.startswith("--config.")]
        print(
            f"ldm-jax: error: bad config override {error} in {' '.join(overrides)}; the keys "
            "and their types are those of the config file (see ldm_jax/config.py:base_config)",
            file=sys.stderr,
        )
        sys.exit(2)
    _configure_logging()
    return parsed


if __name__ == "__main__":
    run()
