"""The command line's vocabulary: every flag of ``ldm-jax`` once, which command reads which
(any other flag given is an error naming the command), each command's usage and
``--help``, and the workdir config the model-loading commands read their overrides into."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from ldm_jax.diffusion import SAMPLERS
from ldm_jax.interop.formats import EXPORT_FORMATS, IMPORT_FORMATS
from ldm_jax.parallel.distributed import DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Python config file, e.g. configs/quickstart.py[:variant]; for sample, evaluate and export "
    "the workdir's own config (override keys with --config.KEY=VALUE).",
    lock_config=True,
)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, metrics, samples)."
)
CACHE_DIR = flags.DEFINE_string(  # the default: see ldm_jax/compilation_cache.py
    "compilation_cache_dir", None, "XLA compilation cache shared by runs; 'none' turns it off."
)
PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt (repeatable).")
LABEL = flags.DEFINE_multi_integer("label", None, "Class label (repeatable).")
NUM_PER_PROMPT = flags.DEFINE_integer(
    "num_per_prompt",
    None,
    "Images per prompt or label (default: the config's sample.num_per_prompt).",
)
SAMPLER = flags.DEFINE_enum(
    "sampler", None, list(SAMPLERS), "Sampler (default: the config's sample.sampler)."
)
STEPS = flags.DEFINE_integer(
    "steps", None, "Sampling steps (default: the config's sample.num_steps)."
)
GUIDANCE = flags.DEFINE_float(
    "guidance",
    None,
    "Classifier-free guidance scale, 1 = none (default: the config's sample.guidance_scale).",
)
GUIDANCE_RESCALE = flags.DEFINE_float(
    "guidance_rescale",
    None,
    "Guidance rescale phi in [0, 1] (default: the config's sample.guidance_rescale).",
)
ETA = flags.DEFINE_float("eta", None, "DDIM eta, 0 = deterministic (default: sample.eta).")
SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
OUT = flags.DEFINE_string(
    "out",
    None,
    "Output: the PNG grid (sample), the results folder (evaluate), the cache folder "
    "(cache-latents), the folder or file to write (export).",
)
CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Stage-2 checkpoint step to sample from (default: newest)."
)
MODE = flags.DEFINE_enum(
    "mode",
    "txt2img",
    ["txt2img", "img2img", "inpaint", "outpaint", "sr"],
    "Generation mode (sr: super-resolution).",
)
INIT_IMAGE = flags.DEFINE_string(
    "init_image", None, "The image to edit (img2img, inpaint, outpaint) or upsample (sr)."
)
MASK = flags.DEFINE_string("mask", None, "--mode=inpaint: mask PNG, white = regenerate.")
STRENGTH = flags.DEFINE_float(
    "strength",
    None,
    "img2img/inpaint noise level in [0, 1], 1 = from pure noise (default: 0.8 for img2img, "
    "else 1).",
)
OUTPAINT = flags.DEFINE_string(
    "outpaint", None, "--mode=outpaint: PIXELS, or LEFT,RIGHT,TOP,BOTTOM, to add."
)
PASTE_BACK = flags.DEFINE_bool(
    "paste_back",
    None,
    "--mode=inpaint|outpaint: keep the input's pixels outside the mask exactly (default); "
    "--nopaste_back: the decoder's output everywhere.",
)
FROM = flags.DEFINE_enum("from", None, list(IMPORT_FORMATS), "Format of the PATH to import.")
TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "--from=single-file: folder with the CLIP vocab.json/merges.txt."
)
PREDICTION_TYPE = flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v", "x0"],
    "--from=single-file: what the U-Net predicts (default epsilon; v for Stable Diffusion 2 "
    "768-v).",
)
IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "--from=single-file: the model's image side in pixels (default: 256 for CompVis LDMs, "
    "768 for v-prediction, else 512).",
)
TO = flags.DEFINE_enum("to", None, list(EXPORT_FORMATS), "Format to export to.")
RAW = flags.DEFINE_bool("raw", False, "Export the online params instead of their EMA.")
WHAT = flags.DEFINE_enum(
    "what",
    None,
    ["samples", "reconstruction", "model", "lora"],
    "evaluate: stage-2 samples (default), or stage-1 reconstructions (PSNR, SSIM, LPIPS); "
    "export: the model (default), or the LoRA adapters of a fine-tune workdir.",
)
FORMAT = flags.DEFINE_enum(
    "format",
    "diffusers",
    ["diffusers", "kohya"],
    "export --what=lora: the LoRA file's layout, diffusers' (peft names) or kohya's (A1111, "
    "ComfyUI).",
)
LORA = flags.DEFINE_multi_string(
    "lora",
    None,
    "A LoRA safetensors file (diffusers or kohya layout) merged into the model, FILE or "
    "FILE:SCALE (default scale 1); repeatable.",
)
NUM_IMAGES = flags.DEFINE_integer(
    "num_images",
    1024,
    "Dataset images: the validation images to reconstruct (--what=reconstruction), or those "
    "of the FID reference statistics (--sweep).",
)
LPIPS_WEIGHTS = flags.DEFINE_string(
    "lpips_weights",
    None,
    "--what=reconstruction: LPIPS safetensors (default: the config's "
    "autoencoder.loss.lpips_weights; none: no LPIPS).",
)
SWEEP = flags.DEFINE_string(
    "sweep",
    None,
    'Sample and score every point of a grid, e.g. "sampler=ddim,dpmpp_2m steps=10,25,50 '
    'guidance=1,3,5 checkpoint=latest,5000"; finished points are skipped.',
)
PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "--sweep: prompts, one per line (default: the preview prompts)."
)
INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "--sweep: FID Inception safetensors, for FID and KID (convert with "
    "python -m ldm_jax.interop.inception_weights).",
)
CLIP_WEIGHTS = flags.DEFINE_string(
    "clip_weights", None, "--sweep: a transformers CLIPModel folder, for the CLIP score."
)
SPLIT = flags.DEFINE_string(
    "split", None, "The split to encode (default: the config's data.train_split)."
)
TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology, e.g. v5p-64, v5e-256, v6e-16 or v5e:2x2."
)
NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology.")
PER_CHIP_BATCH = flags.DEFINE_integer(
    "per_chip_batch", None, "Examples per batch shard (default: from the config)."
)
STAGE = flags.DEFINE_enum(
    "stage",
    None,
    ["diffusion", "autoencoder", "finetune"],
    "The stage whose step to compile (default: config.stage; stage 2 for 'both').",
)
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, to join several processes (default: JAX_COORDINATOR_ADDRESS).",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of the job (default: JAX_NUM_PROCESSES)."
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in the job (default: JAX_PROCESS_ID)."
)
DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", None, "Simulated CPU devices of this process (jax_num_cpu_devices)."
)
INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process of the job to join."
)
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    "Seconds without a heartbeat after which a process counts as dead.",
)

# The flags of the processes of one job, read by the commands that run on the device mesh.
JOB_FLAGS = (
    "coordinator_address",
    "num_processes",
    "process_id",
    "devices_per_process",
    "initialization_timeout",
    "heartbeat_timeout",
)
SAMPLING_FLAGS = ("sampler", "steps", "guidance", "guidance_rescale", "eta", "seed")
# What each command reads: `ldm-jax COMMAND --help` lists these, and any other flag given is
# an error naming the command.
COMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    "train": ("config", "workdir", "compilation_cache_dir", *JOB_FLAGS),
    "sample": (
        "workdir",
        "prompt",
        "label",
        "num_per_prompt",
        *SAMPLING_FLAGS,
        "out",
        "checkpoint_step",
        "mode",
        "init_image",
        "mask",
        "strength",
        "outpaint",
        "paste_back",
        "lora",
        "config",
        "compilation_cache_dir",
        *JOB_FLAGS,
    ),
    "evaluate": (
        "workdir",
        "what",
        "num_per_prompt",
        *SAMPLING_FLAGS,
        "checkpoint_step",
        "out",
        "num_images",
        "lpips_weights",
        "sweep",
        "prompts_file",
        "inception_weights",
        "clip_weights",
        "lora",
        "config",
        "compilation_cache_dir",
        *JOB_FLAGS,
    ),
    "cache-latents": ("workdir", "out", "split", "compilation_cache_dir", *JOB_FLAGS),
    "import": ("from", "workdir", "tokenizer", "prediction_type", "image_size"),
    "export": ("workdir", "to", "what", "format", "out", "raw", "config", "compilation_cache_dir"),
    "compile": ("config", "topology", "num_slices", "per_chip_batch", "stage"),
}
COMMANDS = tuple(COMMAND_FLAGS)
USAGE = {
    "train": "--config=configs/NAME.py[:variant] --workdir=DIR [--config.KEY=VALUE ...]",
    "sample": '--workdir=DIR --prompt="..." | --label=N [flags]',
    "evaluate": "--workdir=DIR [--what=samples|reconstruction] [--sweep=...] [flags]",
    "cache-latents": "--workdir=STAGE1_DIR --out=DIR [--split=NAME]",
    "import": "--from=diffusers|single-file|clip PATH --workdir=DIR [flags]",
    "export": "--workdir=DIR --to=diffusers|safetensors | --what=lora --format=diffusers|kohya "
    "--out=PATH [--raw]",
    "compile": "--config=... --topology=v5p-64 [flags]",
}
# Commands that take one positional argument (the path to import).
POSITIONAL = {"import": "PATH"}
# The commands that run on the device mesh, and so join the job's processes first.
MESH_COMMANDS = ("train", "sample", "evaluate", "cache-latents")
# The commands that load a trained model: their config is the workdir's, with overrides.
MODEL_COMMANDS = ("sample", "evaluate", "export")
WORKDIR_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "config", "from_workdir.py")


def check_command_flags(command: str) -> None:
    """Raises a one-line ValueError for a flag given that ``command`` does not read."""
    known = set(COMMAND_FLAGS[command])
    given = [
        name
        for name in flags.FLAGS
        if flags.FLAGS[name].present and name not in known and not name.startswith("config.")
    ]
    ours = [name for name in given if name in OWN_FLAGS]
    if ours:
        listed = ", ".join(f"--{name}" for name in sorted(ours))
        raise ValueError(
            f"{listed} {'is not a flag' if len(ours) == 1 else 'are not flags'} of "
            f"`ldm-jax {command}`; see `ldm-jax {command} --help`"
        )


def command_help(command: str) -> str:
    """``ldm-jax COMMAND --help``: the command's usage and every flag it reads, with its
    help and default."""
    lines = [f"usage: ldm-jax {command} {USAGE[command]}", "", "flags:"]
    for name in COMMAND_FLAGS[command]:
        flag = flags.FLAGS[name]
        kind = flag.flag_type()
        value = "" if kind == "bool" else f"={name.upper()}"
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{name}{value}: {flag.help}{default}")
    if command in MODEL_COMMANDS:
        lines.append(
            "  --config.KEY=VALUE: override a key of the workdir's config, e.g. "
            "--config.mesh.fsdp=8 to shard the model over 8 devices"
        )
    elif "config" in COMMAND_FLAGS[command]:
        lines.append("  --config.KEY=VALUE: override a key of the config file")
    return "\n".join(lines)


def with_workdir_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=<the workdir's config>`` after the command when a command that
    loads a trained model is given a --workdir that holds a run and no --config: so that
    --config.KEY=VALUE overrides (the mesh) apply to the workdir's config. (Without a run
    there, the command itself says what is missing.)"""
    command = argv[1] if len(argv) > 1 else None
    if command not in MODEL_COMMANDS or any(
        a == "--config" or a.startswith("--config=") for a in argv
    ):
        return argv
    workdirs = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
    from ldm_jax import storage

    if not workdirs or not storage.as_path(workdirs[-1]).joinpath("config.json").is_file():
        return argv
    return [*argv[:2], f"--config={WORKDIR_CONFIG_FILE}:{workdirs[-1]}", *argv[2:]]


# The flags defined here (absl's own, such as --verbosity, are never refused).
OWN_FLAGS = frozenset(name for names in COMMAND_FLAGS.values() for name in names)
