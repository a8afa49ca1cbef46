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
                 [--stage=diffusion|autoencoder|finetune]
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

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

from absl import app, flags

from ldm_jax import cli_flags as cf
from ldm_jax import compilation_cache
from ldm_jax.interop.formats import EXPORT_FORMATS, IMPORT_FORMATS


def _require_workdir() -> str:
    """The --workdir; sets up the persistent compilation cache (a new run skips compiling)."""
    if not cf.WORKDIR.value:
        raise ValueError("--workdir is required")
    compilation_cache.configure(cf.CACHE_DIR.value, cf.WORKDIR.value)
    return cf.WORKDIR.value


def _sampling_overrides() -> dict:
    """The sampling flags as overrides of the config's ``sample`` block (None: not given)."""
    return dict(
        sampler=cf.SAMPLER.value,
        num_steps=cf.STEPS.value,
        guidance_scale=cf.GUIDANCE.value,
        guidance_rescale=cf.GUIDANCE_RESCALE.value,
        eta=cf.ETA.value,
    )


def _model_config(workdir: str):
    """The workdir's config with the command line's overrides (``--config.KEY=VALUE``)."""
    if cf.CONFIG.value is not None:
        return cf.CONFIG.value
    from ldm_jax.config import load_workdir_config

    return load_workdir_config(workdir)  # raises naming config.json when there is none


def _num_per_prompt(config) -> int:
    value = (
        config.sample.num_per_prompt if cf.NUM_PER_PROMPT.value is None else cf.NUM_PER_PROMPT.value
    )
    if value < 1:
        raise ValueError(f"--num_per_prompt={value} must be at least 1")
    return value


def _train() -> None:
    from ldm_jax.train.run import train

    if cf.CONFIG.value is None:
        raise ValueError("--config is required, e.g. --config=configs/quickstart.py")
    workdir = _require_workdir()
    # Preemption (TPU maintenance, SLURM, Ctrl-C): finish the step, checkpoint, exit cleanly.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if not train(cf.CONFIG.value, workdir, should_stop=lambda _: stop.is_set()):
        print(f"stopped early; checkpointed in {workdir}; run the same command to resume")


def _sample() -> None:
    from ldm_jax.pipeline.grids import save_grid
    from ldm_jax.pipeline.image_inputs import mode_inputs
    from ldm_jax.pipeline.workdir import SAMPLES_DIR

    workdir = _require_workdir()
    mode, inputs = mode_inputs(cf.MODE.value, cf.INIT_IMAGE.value, cf.MASK.value, cf.OUTPAINT.value)
    config = _model_config(workdir)
    num = _num_per_prompt(config)
    generator = _generator(workdir, config)
    images = generator.sample(
        cf.SEED.value,
        prompts=cf.PROMPT.value,
        labels=cf.LABEL.value,
        num_per_prompt=num,
        images=inputs,
        **_sampling_overrides(),
        mode=mode,
        strength=cf.STRENGTH.value,
        paste_back=cf.PASTE_BACK.value,
    )
    out = cf.OUT.value or os.path.join(
        workdir, SAMPLES_DIR, f"sample_{time.strftime('%Y%m%d_%H%M%S')}.png"
    )
    save_grid(images, out, columns=num if num <= 16 else None)
    print(f"wrote {len(images)} samples to {out}")


def _generator(workdir: str, config):
    """The Generator of the workdir's model (the --checkpoint_step), the --lora files merged."""
    from ldm_jax.pipeline.finetuned import read_lora_flags, with_lora_files
    from ldm_jax.pipeline.load import load_model

    loras = read_lora_flags(cf.LORA.value or [])
    loaded = load_model(workdir, config, step=cf.CHECKPOINT_STEP.value)
    if loras:
        loaded = dataclasses.replace(loaded, params=with_lora_files(loaded.params, loras))
    return loaded.generator()


def _evaluate() -> None:
    what = cf.WHAT.value or "samples"
    if what not in ("samples", "reconstruction"):
        raise ValueError(f"--what={what}: evaluate takes --what=samples or --what=reconstruction")
    if cf.SWEEP.value is not None:
        return _evaluate_sweep()
    if what == "reconstruction":
        return _evaluate_reconstruction()
    from ldm_jax.evaluate.samples import evaluate_samples

    workdir = _require_workdir()
    config = _model_config(workdir)
    generator = _generator(workdir, config)
    results, out = evaluate_samples(
        generator,
        num_per_prompt=_num_per_prompt(config),
        seed=cf.SEED.value,
        out_dir=cf.OUT.value,
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
    if cf.WHAT.value not in (None, "samples"):
        raise ValueError("--sweep evaluates samples; --what=reconstruction takes no --sweep")
    if cf.LORA.value:
        raise ValueError("--sweep takes no --lora: sweep a fine-tune workdir instead")
    config = _model_config(workdir)
    outcome = run_sample_sweep(
        workdir,
        cf.SWEEP.value,
        config=config,
        out_dir=cf.OUT.value,
        num_per_prompt=_num_per_prompt(config),
        prompts_file=cf.PROMPTS_FILE.value,
        seed=cf.SEED.value,
        inception_weights=cf.INCEPTION_WEIGHTS.value,
        clip_weights=cf.CLIP_WEIGHTS.value,
        num_reference_images=cf.NUM_IMAGES.value,
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
    if cf.NUM_IMAGES.value < 1:
        raise ValueError(f"--num_images={cf.NUM_IMAGES.value} must be at least 1")
    out = cf.OUT.value or os.path.join(workdir, "eval", "reconstruction")
    results = evaluate_workdir(
        workdir,
        out,
        num_images=cf.NUM_IMAGES.value,
        lpips_weights=cf.LPIPS_WEIGHTS.value,
        config=_model_config(workdir),
    )
    print(json.dumps(results))
    print(f"wrote {out}")


def _cache_latents() -> None:
    from ldm_jax.train.latent_cache import cache_latents_of_workdir

    workdir = _require_workdir()
    if not cf.OUT.value:
        raise ValueError("--out is required: the directory to write the latent cache to")
    metadata = cache_latents_of_workdir(workdir, cf.OUT.value, split=cf.SPLIT.value)
    print(
        f"wrote {metadata['num_records']} latents of shape {tuple(metadata['latent_shape'])} "
        f"to {cf.OUT.value}; train stage 2 on them with --config.data.latent_cache={cf.OUT.value}"
    )


def _import(path: str) -> None:
    from ldm_jax.pipeline.import_export import import_model

    if cf.FROM.value is None:
        raise ValueError(f"--from is required: one of {IMPORT_FORMATS}")
    if not cf.WORKDIR.value:
        raise ValueError("--workdir is required: the new workdir to write")
    print(
        import_model(
            cf.FROM.value,
            path,
            cf.WORKDIR.value,
            tokenizer=cf.TOKENIZER.value,
            prediction_type=cf.PREDICTION_TYPE.value,
            image_size=cf.IMAGE_SIZE.value,
        )
    )


def _export() -> None:
    from ldm_jax.pipeline.import_export import export_lora, export_workdir

    workdir = _require_workdir()
    what = cf.WHAT.value or "model"
    if what not in ("model", "lora"):
        raise ValueError(f"--what={what}: export takes --what=model or --what=lora")
    if what == "lora":
        if not cf.OUT.value:
            raise ValueError("--out is required: the .safetensors file to write")
        if cf.TO.value is not None:
            raise ValueError("--what=lora writes one file in --format=diffusers|kohya; drop --to")
        config = _model_config(workdir)
        print(export_lora(workdir, cf.OUT.value, cf.FORMAT.value, raw=cf.RAW.value, config=config))
        return
    if cf.TO.value is None or not cf.OUT.value:
        raise ValueError(f"--to (one of {EXPORT_FORMATS}) and --out are required")
    config = _model_config(workdir)
    print(export_workdir(workdir, cf.TO.value, cf.OUT.value, raw=cf.RAW.value, config=config))


def _compile() -> None:
    from ldm_jax.train.compile import compile_for_topology

    if cf.CONFIG.value is None or not cf.TOPOLOGY.value:
        raise ValueError("--config and --topology are required, e.g. --topology=v5e:2x2")
    report = compile_for_topology(
        cf.CONFIG.value,
        cf.TOPOLOGY.value,
        num_slices=cf.NUM_SLICES.value,
        per_chip_batch=cf.PER_CHIP_BATCH.value,
        stage=cf.STAGE.value,
    )
    print(f"topology: {cf.TOPOLOGY.value} x {cf.NUM_SLICES.value} slice(s)")
    print("\n".join(report.lines()))


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) > 1 else None
    positional = argv[2:]
    if command not in cf.COMMANDS or len(positional) != (command in cf.POSITIONAL):
        usage = f"ldm-jax {{{'|'.join(cf.COMMANDS)}}} [--flags]; import takes one PATH"
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
        cf.check_command_flags(command)
        if command in cf.MESH_COMMANDS:
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
        coordinator_address=cf.COORDINATOR_ADDRESS.value,
        num_processes=cf.NUM_PROCESSES.value,
        process_id=cf.PROCESS_ID.value,
        devices_per_process=cf.DEVICES_PER_PROCESS.value,
        initialization_timeout=cf.INITIALIZATION_TIMEOUT.value,
        heartbeat_timeout=cf.HEARTBEAT_TIMEOUT.value,
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
        and sys.argv[1] in cf.COMMANDS
        and {"-h", "--help", "--helpfull"} & set(sys.argv[2:])
    ):
        print(cf.command_help(sys.argv[1]))
        sys.exit(0)
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    # ml_collections reads --config and its overrides from sys.argv as well.
    argv[:] = cf.with_workdir_config(argv)
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


if __name__ == "__main__":
    run()
