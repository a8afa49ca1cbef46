"""The ``ldm-jax`` command line: flags, dispatch, and one clear line for a user's mistake.

ldm-jax train    --config=configs/quickstart.py --workdir=DIR [--config.KEY=VALUE ...]
ldm-jax sample   --workdir=DIR --prompt="a red circle" | --label=N  [--num --sampler --steps
                 --guidance --eta --seed --out]
ldm-jax evaluate --workdir=DIR [--what=samples|reconstruction] [--num_per_prompt --sampler
                 --steps --guidance --seed | --num_images --lpips_weights]
                 [--sweep="key=v1,v2 ..." --prompts_file --inception_weights --clip_weights]
ldm-jax cache-latents --workdir=STAGE1_DIR --out=DIR [--split=NAME]
ldm-jax import   --from=diffusers|single-file|clip PATH --workdir=DIR [--tokenizer=DIR]
ldm-jax export   --workdir=DIR --to=diffusers|safetensors --out=PATH [--raw]
ldm-jax compile  --config=... --topology=v5p-64 [--num_slices=N] [--per_chip_batch=N]
                 [--stage=diffusion|autoencoder]
ldm-jax launch   local|tpu|gke|slurm [--dry-run] [launcher flags] -- <ldm-jax command>

Several processes (hosts) join one runtime with --coordinator_address, --num_processes and
--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU VMs and
under SLURM they join by themselves. A process that dies stops the others at once; one that
hangs, after --heartbeat_timeout seconds.
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

from ldm_jax import compilation_cache
from ldm_jax.diffusion import SAMPLERS
from ldm_jax.interop.formats import EXPORT_FORMATS, IMPORT_FORMATS
from ldm_jax.parallel.distributed import DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

COMMANDS = ("train", "sample", "evaluate", "cache-latents", "import", "export", "compile")
# Commands that take one positional argument (the path to import).
_POSITIONAL = {"import": "PATH"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file, e.g. configs/quickstart.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, metrics, samples)."
)
_CACHE_DIR = flags.DEFINE_string(  # the default: see ldm_jax/compilation_cache.py
    "compilation_cache_dir", None, "XLA compilation cache shared by runs; 'none' turns it off."
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
_GUIDANCE_RESCALE = flags.DEFINE_float(
    "guidance_rescale", None, "Guidance rescale phi in [0, 1] (default: sample.guidance_rescale)."
)
_MODE = flags.DEFINE_string(
    "mode", "txt2img", "`sample`: txt2img, img2img, inpaint, outpaint or sr (super-resolution)."
)
_INIT_IMAGE = flags.DEFINE_string(
    "init_image", None, "`sample`: the image to edit (img2img, inpaint, outpaint) or upsample (sr)."
)
_MASK = flags.DEFINE_string("mask", None, "`sample --mode=inpaint`: mask PNG, white = regenerate.")
_STRENGTH = flags.DEFINE_float(
    "strength", None, "`sample`: img2img/inpaint noise level in [0, 1] (1 = from pure noise)."
)
_OUTPAINT = flags.DEFINE_string(
    "outpaint", None, "`sample --mode=outpaint`: PIXELS, or LEFT,RIGHT,TOP,BOTTOM, to add."
)
_PASTE_BACK = flags.DEFINE_bool(
    "paste_back",
    True,
    "`sample --mode=inpaint|outpaint`: keep the input's pixels outside the mask exactly "
    "(--nopaste_back: the decoder's output everywhere).",
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
    "num_images",
    1024,
    "`evaluate`: validation images to reconstruct (--what=reconstruction), or of the FID "
    "reference statistics (--sweep).",
)
_LPIPS_WEIGHTS = flags.DEFINE_string(
    "lpips_weights",
    None,
    "`evaluate --what=reconstruction`: LPIPS safetensors (default: the config's "
    "autoencoder.loss.lpips_weights; none: no LPIPS).",
)
_SWEEP = flags.DEFINE_string(
    "sweep",
    None,
    '`evaluate`: sample and score every point of a grid, e.g. "sampler=ddim,dpmpp_2m '
    'steps=10,25,50 guidance=1,3,5 checkpoint=latest,5000"; finished points are skipped.',
)
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "`evaluate --sweep`: prompts, one per line (default: shapes prompts)."
)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "`evaluate --sweep`: FID Inception safetensors, for FID and KID (convert with "
    "python -m ldm_jax.interop.inception_weights).",
)
_CLIP_WEIGHTS = flags.DEFINE_string(
    "clip_weights", None, "`evaluate --sweep`: a transformers CLIPModel folder, for the CLIP score."
)
_SPLIT = flags.DEFINE_string(
    "split", None, "`cache-latents`: the split to encode (default: config data.train_split)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "`compile`: TPU topology, e.g. v5p-64, v5e-256, v6e-16 or v5e:2x2."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "`compile`: slices of the topology.")
_PER_CHIP_BATCH = flags.DEFINE_integer(
    "per_chip_batch", None, "`compile`: examples per batch shard (default: from the config)."
)
_STAGE = flags.DEFINE_enum(
    "stage",
    "diffusion",
    ["diffusion", "autoencoder"],
    "`compile`: the stage whose step to compile.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, to join several processes (default: JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of the job (default: JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in the job (default: JAX_PROCESS_ID)."
)
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", None, "Simulated CPU devices of this process (jax_num_cpu_devices)."
)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process of the job to join."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    "Seconds without a heartbeat after which a process counts as dead.",
)
# The commands that run on the device mesh, and so join the job's processes first.
_MESH_COMMANDS = ("train", "sample", "evaluate", "cache-latents")


def _require_workdir() -> str:
    """The --workdir; sets up the persistent compilation cache (a new run skips compiling)."""
    if not _WORKDIR.value:
        raise ValueError("--workdir is required")
    compilation_cache.configure(_CACHE_DIR.value, _WORKDIR.value)
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
        guidance_rescale=_GUIDANCE_RESCALE.value,
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
    import dataclasses

    import numpy as np

    from ldm_jax.evaluate.grid import save_grid
    from ldm_jax.sample_inputs import DEFAULT_STRENGTH, mode_inputs
    from ldm_jax.train.diffusion import load_generator

    workdir = _require_workdir()
    if _NUM.value < 1:
        raise ValueError(f"--num={_NUM.value} must be at least 1")
    mode, inputs = mode_inputs(_MODE.value, _INIT_IMAGE.value, _MASK.value, _OUTPAINT.value)
    generator, config = load_generator(workdir, _sampling_mesh(), step=_CHECKPOINT_STEP.value)
    prompts = [p for p in (_PROMPT.value or []) for _ in range(_NUM.value)] or None
    labels = [n for n in (_LABEL.value or []) for _ in range(_NUM.value)] or None
    if config.diffusion.conditioning == "none":
        prompts = [""] * _NUM.value
    strength = _STRENGTH.value if _STRENGTH.value is not None else DEFAULT_STRENGTH.get(mode, 1.0)
    options = dataclasses.replace(
        _options(config), mode=mode, strength=strength, paste_back=_PASTE_BACK.value
    )
    # The mode before the prompts: an sr model asked for txt2img hears about the mode.
    generator.check_inputs(options, {key: image[None] for key, image in inputs.items()})
    conditions = generator.conditions(prompts, labels)
    inputs = {key: np.repeat(image[None], len(conditions), axis=0) for key, image in inputs.items()}
    images = generator(conditions, seed=_SEED.value, options=options, images=inputs)
    out = _OUT.value or os.path.join(
        workdir, "samples", f"sample_{time.strftime('%Y%m%d_%H%M%S')}.png"
    )
    save_grid(images, out, columns=_NUM.value if _NUM.value <= 16 else None)
    print(f"wrote {len(images)} samples to {out}")


def _evaluate() -> None:
    if _SWEEP.value is not None:
        return _evaluate_sweep()
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


def _evaluate_sweep() -> None:
    from ldm_jax.evaluate.sweep import run_sample_sweep
    from ldm_jax.evaluate.sweep_results import summary_table

    workdir = _require_workdir()
    if _WHAT.value != "samples":
        raise ValueError("--sweep evaluates samples; --what=reconstruction takes no --sweep")
    outcome = run_sample_sweep(
        workdir,
        _sampling_mesh(),
        _SWEEP.value,
        out_dir=_OUT.value,
        num_per_prompt=_NUM_PER_PROMPT.value,
        prompts_file=_PROMPTS_FILE.value,
        seed=_SEED.value,
        inception_weights=_INCEPTION_WEIGHTS.value,
        clip_weights=_CLIP_WEIGHTS.value,
        num_reference_images=_NUM_IMAGES.value,
    )
    print(summary_table(outcome.rows, outcome.swept))
    for note in outcome.unavailable:
        print(f"unavailable: {note}")
    print(
        f"{outcome.run} points run, {outcome.skipped} skipped (finished before); "
        f"wrote {outcome.out_dir}"
    )


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


def _compile() -> None:
    from ldm_jax.train.compile import compile_for_topology

    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise ValueError("--config and --topology are required, e.g. --topology=v5e:2x2")
    report = compile_for_topology(
        _CONFIG.value,
        _TOPOLOGY.value,
        num_slices=_NUM_SLICES.value,
        per_chip_batch=_PER_CHIP_BATCH.value,
        stage=_STAGE.value,
    )
    print(f"topology: {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s)")
    print("\n".join(report.lines()))


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
        "compile": _compile,
    }
    try:
        if command in _MESH_COMMANDS:
            _join_processes()
        commands[command]()
    except (ConfigError, OSError, ValueError, FloatingPointError) as error:
        print(f"ldm-jax {command}: error: {_one_line(error)}", file=sys.stderr)
        from ldm_jax.parallel import peers

        peers.exit_job(2)  # several processes: the others stop too, not waiting for this one
        sys.exit(2)


def _join_processes() -> None:
    """Joins the job's processes (if there are several); only process 0 logs progress."""
    import jax

    from ldm_jax.parallel import distributed

    options = distributed.options_from(
        coordinator_address=_COORDINATOR_ADDRESS.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        devices_per_process=_DEVICES_PER_PROCESS.value,
        initialization_timeout=_INITIALIZATION_TIMEOUT.value,
        heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
        environ=os.environ,
    )
    if distributed.initialize(options, os.environ) and jax.process_index() > 0:
        # Every process runs the same steps: one copy of the progress is enough; warnings
        # and errors still show.
        logging.getLogger("ldm_jax").setLevel(logging.WARNING)


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
    from ldm_jax.parallel import platforms

    platforms.skip_absent_tpu()  # before any JAX backend starts
    if sys.argv[1:2] == ["launch"]:
        # The launcher has flags of its own and passes everything after `--` on untouched.
        from ldm_jax.launch.main import main as launch

        sys.exit(launch(sys.argv[2:]))
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        parsed = flags.FLAGS(argv)
    except flags.Error as error:
        print(f"ldm-jax: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections raises these for an override of a key the config does not have,
        # or a value of the wrong type.
        overrides = " ".join(" ".join(a.split()) for a in argv if a.startswith("--config."))
        print(
            f"ldm-jax: error: bad config override {_one_line(error)} in {overrides}; the keys "
            "and their types are those of the config file (see ldm_jax/config.py:base_config)",
            file=sys.stderr,
        )
        sys.exit(2)
    except Exception as error:  # the --config file's own code raised (SyntaxError, ...)
        name = type(error).__name__
        print(f"ldm-jax: error: --config file failed: {name}: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    _configure_logging()
    return parsed


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; of a traceback inside it (ml_collections quotes
    the one of a config file that raised), only the exception at its end."""
    text = str(error)
    head, marker, trace = text.partition("Traceback (most recent call last):")
    if marker:
        lines = [line for line in trace.splitlines() if line.strip()]
        text = f"{head} {lines[-1] if lines else ''}"
    return " ".join(text.split())


if __name__ == "__main__":
    run()
