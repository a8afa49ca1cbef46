"""The ``ldm-jax`` command line: flags, dispatch, and one clear line for a user's mistake.

ldm-jax train    --config=configs/quickstart.py --workdir=DIR [--config.KEY=VALUE ...]
ldm-jax sample   --workdir=DIR --prompt="a red circle" | --label=N  [--num_per_prompt
                 --sampler --steps --guidance --eta --seed --out --mode ...]
ldm-jax evaluate --workdir=DIR [--what=samples|reconstruction] [--num_per_prompt --sampler
                 --steps --guidance --seed | --num_images --lpips_weights]
                 [--sweep="key=v1,v2 ..." --prompts_file --inception_weights --clip_weights]
ldm-jax cache-latents --workdir=STAGE1_DIR --out=DIR [--split=NAME]
ldm-jax import   --from=diffusers|single-file|clip PATH --workdir=DIR [--tokenizer=DIR]
ldm-jax export   --workdir=DIR --to=diffusers|safetensors --out=PATH [--raw]
ldm-jax compile  --config=... --topology=v5p-64 [--num_slices=N] [--per_chip_batch=N]
                 [--stage=diffusion|autoencoder]
ldm-jax launch   local|tpu|gke|slurm [--dry-run] [launcher flags] -- <ldm-jax command>

`ldm-jax COMMAND --help` lists the flags of a command with their defaults. `sample`,
`evaluate` and `export` load the model on the mesh of the workdir's config; override it (or
any key) with --config.KEY=VALUE, e.g. --config.mesh.fsdp=8.

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

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Python config file, e.g. configs/quickstart.py[:variant]; for sample, evaluate and export "
    "the workdir's own config (override keys with --config.KEY=VALUE).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, metrics, samples)."
)
_CACHE_DIR = flags.DEFINE_string(  # the default: see ldm_jax/compilation_cache.py
    "compilation_cache_dir", None, "XLA compilation cache shared by runs; 'none' turns it off."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt (repeatable).")
_LABEL = flags.DEFINE_multi_integer("label", None, "Class label (repeatable).")
_NUM_PER_PROMPT = flags.DEFINE_integer(
    "num_per_prompt",
    None,
    "Images per prompt or label (default: the config's sample.num_per_prompt).",
)
_SAMPLER = flags.DEFINE_enum(
    "sampler", None, list(SAMPLERS), "Sampler (default: the config's sample.sampler)."
)
_STEPS = flags.DEFINE_integer(
    "steps", None, "Sampling steps (default: the config's sample.num_steps)."
)
_GUIDANCE = flags.DEFINE_float(
    "guidance",
    None,
    "Classifier-free guidance scale, 1 = none (default: the config's sample.guidance_scale).",
)
_GUIDANCE_RESCALE = flags.DEFINE_float(
    "guidance_rescale",
    None,
    "Guidance rescale phi in [0, 1] (default: the config's sample.guidance_rescale).",
)
_ETA = flags.DEFINE_float("eta", None, "DDIM eta, 0 = deterministic (default: sample.eta).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Output: the PNG grid (sample), the results folder (evaluate), the cache folder "
    "(cache-latents), the folder or file to write (export).",
)
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Stage-2 checkpoint step to sample from (default: newest)."
)
_MODE = flags.DEFINE_enum(
    "mode",
    "txt2img",
    ["txt2img", "img2img", "inpaint", "outpaint", "sr"],
    "Generation mode (sr: super-resolution).",
)
_INIT_IMAGE = flags.DEFINE_string(
    "init_image", None, "The image to edit (img2img, inpaint, outpaint) or upsample (sr)."
)
_MASK = flags.DEFINE_string("mask", None, "--mode=inpaint: mask PNG, white = regenerate.")
_STRENGTH = flags.DEFINE_float(
    "strength",
    None,
    "img2img/inpaint noise level in [0, 1], 1 = from pure noise (default: 0.8 for img2img, "
    "else 1).",
)
_OUTPAINT = flags.DEFINE_string(
    "outpaint", None, "--mode=outpaint: PIXELS, or LEFT,RIGHT,TOP,BOTTOM, to add."
)
_PASTE_BACK = flags.DEFINE_bool(
    "paste_back",
    None,
    "--mode=inpaint|outpaint: keep the input's pixels outside the mask exactly (default); "
    "--nopaste_back: the decoder's output everywhere.",
)
_FROM = flags.DEFINE_enum("from", None, list(IMPORT_FORMATS), "Format of the PATH to import.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "--from=single-file: folder with the CLIP vocab.json/merges.txt."
)
_PREDICTION_TYPE = flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v", "x0"],
    "--from=single-file: what the U-Net predicts (default epsilon; v for Stable Diffusion 2 "
    "768-v).",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "--from=single-file: the model's image side in pixels (default: 256 for CompVis LDMs, "
    "768 for v-prediction, else 512).",
)
_TO = flags.DEFINE_enum("to", None, list(EXPORT_FORMATS), "Format to export to.")
_RAW = flags.DEFINE_bool("raw", False, "Export the online params instead of their EMA.")
_WHAT = flags.DEFINE_enum(
    "what",
    "samples",
    ["samples", "reconstruction"],
    "Stage-2 samples, or stage-1 reconstructions (PSNR, SSIM, LPIPS).",
)
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images",
    1024,
    "Dataset images: the validation images to reconstruct (--what=reconstruction), or those "
    "of the FID reference statistics (--sweep).",
)
_LPIPS_WEIGHTS = flags.DEFINE_string(
    "lpips_weights",
    None,
    "--what=reconstruction: LPIPS safetensors (default: the config's "
    "autoencoder.loss.lpips_weights; none: no LPIPS).",
)
_SWEEP = flags.DEFINE_string(
    "sweep",
    None,
    'Sample and score every point of a grid, e.g. "sampler=ddim,dpmpp_2m steps=10,25,50 '
    'guidance=1,3,5 checkpoint=latest,5000"; finished points are skipped.',
)
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "--sweep: prompts, one per line (default: the preview prompts)."
)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "--sweep: FID Inception safetensors, for FID and KID (convert with "
    "python -m ldm_jax.interop.inception_weights).",
)
_CLIP_WEIGHTS = flags.DEFINE_string(
    "clip_weights", None, "--sweep: a transformers CLIPModel folder, for the CLIP score."
)
_SPLIT = flags.DEFINE_string(
    "split", None, "The split to encode (default: the config's data.train_split)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology, e.g. v5p-64, v5e-256, v6e-16 or v5e:2x2."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology.")
_PER_CHIP_BATCH = flags.DEFINE_integer(
    "per_chip_batch", None, "Examples per batch shard (default: from the config)."
)
_STAGE = flags.DEFINE_enum(
    "stage", "diffusion", ["diffusion", "autoencoder"], "The stage whose step to compile."
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

# The flags of the processes of one job, read by the commands that run on the device mesh.
_JOB_FLAGS = (
    "coordinator_address",
    "num_processes",
    "process_id",
    "devices_per_process",
    "initialization_timeout",
    "heartbeat_timeout",
)
_SAMPLING_FLAGS = ("sampler", "steps", "guidance", "guidance_rescale", "eta", "seed")
# What each command reads: `ldm-jax COMMAND --help` lists these, and any other flag given is
# an error naming the command.
COMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    "train": ("config", "workdir", "compilation_cache_dir", *_JOB_FLAGS),
    "sample": (
        "workdir",
        "prompt",
        "label",
        "num_per_prompt",
        *_SAMPLING_FLAGS,
        "out",
        "checkpoint_step",
        "mode",
        "init_image",
        "mask",
        "strength",
        "outpaint",
        "paste_back",
        "config",
        "compilation_cache_dir",
        *_JOB_FLAGS,
    ),
    "evaluate": (
        "workdir",
        "what",
        "num_per_prompt",
        *_SAMPLING_FLAGS,
        "checkpoint_step",
        "out",
        "num_images",
        "lpips_weights",
        "sweep",
        "prompts_file",
        "inception_weights",
        "clip_weights",
        "config",
        "compilation_cache_dir",
        *_JOB_FLAGS,
    ),
    "cache-latents": ("workdir", "out", "split", "compilation_cache_dir", *_JOB_FLAGS),
    "import": ("from", "workdir", "tokenizer", "prediction_type", "image_size"),
    "export": ("workdir", "to", "out", "raw", "config", "compilation_cache_dir"),
    "compile": ("config", "topology", "num_slices", "per_chip_batch", "stage"),
}
COMMANDS = tuple(COMMAND_FLAGS)
_USAGE = {
    "train": "--config=configs/NAME.py[:variant] --workdir=DIR [--config.KEY=VALUE ...]",
    "sample": '--workdir=DIR --prompt="..." | --label=N [flags]',
    "evaluate": "--workdir=DIR [--what=samples|reconstruction] [--sweep=...] [flags]",
    "cache-latents": "--workdir=STAGE1_DIR --out=DIR [--split=NAME]",
    "import": "--from=diffusers|single-file|clip PATH --workdir=DIR [flags]",
    "export": "--workdir=DIR --to=diffusers|safetensors --out=PATH [--raw]",
    "compile": "--config=... --topology=v5p-64 [flags]",
}
# Commands that take one positional argument (the path to import).
_POSITIONAL = {"import": "PATH"}
# The commands that run on the device mesh, and so join the job's processes first.
_MESH_COMMANDS = ("train", "sample", "evaluate", "cache-latents")
# The commands that load a trained model: their config is the workdir's, with overrides.
_MODEL_COMMANDS = ("sample", "evaluate", "export")
_WORKDIR_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "config", "from_workdir.py")


def _require_workdir() -> str:
    """The --workdir; sets up the persistent compilation cache (a new run skips compiling)."""
    if not _WORKDIR.value:
        raise ValueError("--workdir is required")
    compilation_cache.configure(_CACHE_DIR.value, _WORKDIR.value)
    return _WORKDIR.value


def _sampling_overrides() -> dict:
    """The sampling flags as overrides of the config's ``sample`` block (None: not given)."""
    return dict(
        sampler=_SAMPLER.value,
        num_steps=_STEPS.value,
        guidance_scale=_GUIDANCE.value,
        guidance_rescale=_GUIDANCE_RESCALE.value,
        eta=_ETA.value,
    )


def _model_config(workdir: str):
    """The workdir's config with the command line's overrides (``--config.KEY=VALUE``)."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    from ldm_jax.config import load_workdir_config

    return load_workdir_config(workdir)  # raises naming config.json when there is none


def _num_per_prompt(config) -> int:
    value = config.sample.num_per_prompt if _NUM_PER_PROMPT.value is None else _NUM_PER_PROMPT.value
    if value < 1:
        raise ValueError(f"--num_per_prompt={value} must be at least 1")
    return value


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
    from ldm_jax.pipeline.grids import save_grid
    from ldm_jax.pipeline.image_inputs import mode_inputs
    from ldm_jax.pipeline.load import load_generator
    from ldm_jax.pipeline.workdir import SAMPLES_DIR

    workdir = _require_workdir()
    mode, inputs = mode_inputs(_MODE.value, _INIT_IMAGE.value, _MASK.value, _OUTPAINT.value)
    config = _model_config(workdir)
    num = _num_per_prompt(config)
    generator = load_generator(workdir, config, step=_CHECKPOINT_STEP.value)
    images = generator.sample(
        _SEED.value,
        prompts=_PROMPT.value,
        labels=_LABEL.value,
        num_per_prompt=num,
        images=inputs,
        **_sampling_overrides(),
        mode=mode,
        strength=_STRENGTH.value,
        paste_back=_PASTE_BACK.value,
    )
    out = _OUT.value or os.path.join(
        workdir, SAMPLES_DIR, f"sample_{time.strftime('%Y%m%d_%H%M%S')}.png"
    )
    save_grid(images, out, columns=num if num <= 16 else None)
    print(f"wrote {len(images)} samples to {out}")


def _evaluate() -> None:
    if _SWEEP.value is not None:
        return _evaluate_sweep()
    if _WHAT.value == "reconstruction":
        return _evaluate_reconstruction()
    from ldm_jax.evaluate.samples import evaluate_samples
    from ldm_jax.pipeline.load import load_generator

    workdir = _require_workdir()
    config = _model_config(workdir)
    generator = load_generator(workdir, config, step=_CHECKPOINT_STEP.value)
    results, out = evaluate_samples(
        generator,
        num_per_prompt=_num_per_prompt(config),
        seed=_SEED.value,
        out_dir=_OUT.value,
        workdir=workdir,
        **_sampling_overrides(),
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
    config = _model_config(workdir)
    outcome = run_sample_sweep(
        workdir,
        _SWEEP.value,
        config=config,
        out_dir=_OUT.value,
        num_per_prompt=_num_per_prompt(config),
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
        out,
        num_images=_NUM_IMAGES.value,
        lpips_weights=_LPIPS_WEIGHTS.value,
        config=_model_config(workdir),
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
    from ldm_jax.pipeline.import_export import import_model

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
    from ldm_jax.pipeline.import_export import export_workdir

    workdir = _require_workdir()
    if _TO.value is None or not _OUT.value:
        raise ValueError(f"--to (one of {EXPORT_FORMATS}) and --out are required")
    config = _model_config(workdir)
    print(export_workdir(workdir, _TO.value, _OUT.value, raw=_RAW.value, config=config))


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
        _check_command_flags(command)
        if command in _MESH_COMMANDS:
            _join_processes()
        commands[command]()
    except (ConfigError, OSError, ValueError, FloatingPointError) as error:
        print(f"ldm-jax {command}: error: {_one_line(error)}", file=sys.stderr)
        from ldm_jax.parallel import peers

        peers.exit_job(2)  # several processes: the others stop too, not waiting for this one
        sys.exit(2)


def _check_command_flags(command: str) -> None:
    """Raises a one-line ValueError for a flag given that ``command`` does not read."""
    known = set(COMMAND_FLAGS[command])
    given = [
        name
        for name in flags.FLAGS
        if flags.FLAGS[name].present and name not in known and not name.startswith("config.")
    ]
    ours = [name for name in given if name in _OWN_FLAGS]
    if ours:
        listed = ", ".join(f"--{name}" for name in sorted(ours))
        raise ValueError(
            f"{listed} {'is not a flag' if len(ours) == 1 else 'are not flags'} of "
            f"`ldm-jax {command}`; see `ldm-jax {command} --help`"
        )


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


def command_help(command: str) -> str:
    """``ldm-jax COMMAND --help``: the command's usage and every flag it reads, with its
    help and default."""
    lines = [f"usage: ldm-jax {command} {_USAGE[command]}", "", "flags:"]
    for name in COMMAND_FLAGS[command]:
        flag = flags.FLAGS[name]
        kind = flag.flag_type()
        value = "" if kind == "bool" else f"={name.upper()}"
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{name}{value}: {flag.help}{default}")
    if command in _MODEL_COMMANDS:
        lines.append(
            "  --config.KEY=VALUE: override a key of the workdir's config, e.g. "
            "--config.mesh.fsdp=8 to shard the model over 8 devices"
        )
    elif "config" in COMMAND_FLAGS[command]:
        lines.append("  --config.KEY=VALUE: override a key of the config file")
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point."""
    from ldm_jax import storage
    from ldm_jax.parallel import platforms

    platforms.skip_absent_tpu()  # before any JAX backend starts
    storage.configure_emulators()
    if sys.argv[1:2] == ["launch"]:
        # The launcher has flags of its own and passes everything after `--` on untouched.
        from ldm_jax.launch.main import main as launch

        sys.exit(launch(sys.argv[2:]))
    if (
        sys.argv[1:2]
        and sys.argv[1] in COMMANDS
        and {"-h", "--help", "--helpfull"} & set(sys.argv[2:])
    ):
        print(command_help(sys.argv[1]))
        sys.exit(0)
    app.run(main, flags_parser=_parse_flags)


def _with_workdir_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=<the workdir's config>`` after the command when a command that
    loads a trained model is given a --workdir that holds a run and no --config: so that
    --config.KEY=VALUE overrides (the mesh) apply to the workdir's config. (Without a run
    there, the command itself says what is missing.)"""
    command = argv[1] if len(argv) > 1 else None
    if command not in _MODEL_COMMANDS or any(
        a == "--config" or a.startswith("--config=") for a in argv
    ):
        return argv
    workdirs = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
    from ldm_jax import storage

    if not workdirs or not storage.as_path(workdirs[-1]).joinpath("config.json").is_file():
        return argv
    return [*argv[:2], f"--config={_WORKDIR_CONFIG_FILE}:{workdirs[-1]}", *argv[2:]]


def _parse_flags(argv: list[str]) -> list[str]:
    # ml_collections reads --config and its overrides from sys.argv as well.
    argv[:] = _with_workdir_config(argv)
    if sys.argv is not argv:
        sys.argv[:] = argv
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
            "and their types are those of the config file (see "
            "ldm_jax/config/schema.py:base_config)",
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


# The flags this module defines (absl's own, such as --verbosity, are never refused).
_OWN_FLAGS = frozenset(name for names in COMMAND_FLAGS.values() for name in names)

if __name__ == "__main__":
    run()
