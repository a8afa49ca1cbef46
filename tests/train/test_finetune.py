"""Fine-tuning a trained model (``configs/finetune.py``, ``config.stage="finetune"``) on the
tiny quickstart: LoRA trains and saves only its adapters and leaves the base workdir as it
was; the fine-tune workdir loads as the base with its adapters merged; with FSDP the frozen
base is sharded and the adapters are the single-device run's; DreamBooth draws its class
images once and weighs the prior; a stopped run resumes exactly; bad input is one line
naming the key."""

import hashlib
import re

import jax
import numpy as np
import pytest
from conftest import ROOT, StopAtCall, cli_session, load_config
from flax import traverse_util

from ldm_jax import cli
from ldm_jax import config as config_lib
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.interop import lora as lora_files
from ldm_jax.models import lora
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import finetuned
from ldm_jax.pipeline.load import load_model
from ldm_jax.train import finetune
from ldm_jax.train import frozen as frozen_inputs
from ldm_jax.train.loop import jit_train_step
from ldm_jax.train.run import train

LORA_STEPS = 4
# The U-Net modules the "attention" targets adapt.
ATTENTION_KERNEL = re.compile(r"(attn1|attn2)/(to_q|to_k|to_v|to_out_0)$")


def _file_digests(workdir) -> dict:
    """Every file under ``workdir`` (checkpoints, config.json, ...) and its content's hash."""
    return {
        str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(workdir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
    """The tiny quickstart trained once (both stages): the model every test fine-tunes."""
    config = load_config("quickstart", "tiny")
    workdir = tmp_path_factory.mktemp("base") / "run"
    assert train(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def base_files(base_workdir):
    """The base workdir's files before any fine-tune run read it."""
    return _file_digests(base_workdir)


def _lora_config(base_workdir):
    config = load_config("finetune", f"lora,{base_workdir}")
    config.finetune.train.steps = LORA_STEPS
    config.data.num_train_examples = 32  # a fine-tuning set is small
    return config


def _run_finetune(config, workdir, should_stop=None):
    """``ldm-jax train`` of a fine-tune config in this process; returns whether it finished
    and the train state it ended with."""
    states = []
    original = finetune.train

    def keep_state(*args, **kwargs):
        states.append(original(*args, **kwargs))
        return states[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "train", keep_state)
        finished = train(config, str(workdir), should_stop)
    return finished, states[0]


@pytest.fixture(scope="module")
def lora_run(base_workdir, base_files, tmp_path_factory):
    """A LoRA run of ``LORA_STEPS`` uninterrupted steps: (workdir, final train state)."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    finished, state = _run_finetune(_lora_config(base_workdir), workdir)
    assert finished
    return workdir, state


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(sharding.to_host(tree))


def _directory_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_lora_trains_and_saves_only_adapters_and_leaves_the_base_as_it_was(
    base_workdir, base_files, lora_run
):
    workdir, state = lora_run
    assert int(state.step) == LORA_STEPS
    assert list(state.params) == ["lora"] and list(state.params["lora"]) == ["unet"]
    adapters = state.params["lora"]["unet"]
    paths = lora.adapter_paths(adapters)
    assert paths and all(ATTENTION_KERNEL.search("/".join(p)) for p in paths)
    base_unet = _flat(load_model(str(base_workdir)).params["unet"])
    adaptable = [
        k[:-1] for k in base_unet if k[-1] == "kernel" and ATTENTION_KERNEL.search("/".join(k[:-1]))
    ]
    assert sorted(paths) == sorted(adaptable)  # every attention projection, nothing else

    # The optimizer keeps Adam's two moments of the adapters (and scalar step counts) only.
    adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert {m.shape for m in moments} <= adapter_shapes
    assert sum(m.size for m in moments) == 2 * lora.num_params(adapters)

    # Training moved the adapters: every `up` started at zero.
    ups = {key: value for key, value in _flat(adapters).items() if key[-1] == lora.UP}
    assert len(ups) == len(paths)
    for key, up in ups.items():
        assert np.any(up != 0), key

    # Its checkpoint holds the adapters only; the base's holds the whole model.
    finetune_checkpoint = workdir / "checkpoints" / "finetune" / str(LORA_STEPS)
    base_checkpoint = max(
        (base_workdir / "checkpoints" / "diffusion").iterdir(), key=lambda p: int(p.name)
    )
    assert _directory_bytes(finetune_checkpoint) < _directory_bytes(base_checkpoint) / 5
    assert _file_digests(base_workdir) == base_files


@pytest.mark.slow
def test_a_lora_workdir_loads_as_the_base_with_its_adapters_merged(base_workdir, lora_run):
    workdir, state = lora_run
    config = config_lib.load_workdir_config(str(workdir))
    scale = config.finetune.lora.alpha / config.finetune.lora.rank
    adapters = _flat(state.ema_params["lora"]["unet"])  # what sampling loads
    base = load_model(str(base_workdir))
    tuned = load_model(str(workdir))
    assert tuned.step == LORA_STEPS

    base_unet, tuned_unet = _flat(base.params["unet"]), _flat(tuned.params["unet"])
    assert tuned_unet.keys() == base_unet.keys()
    adapted = 0
    for key, value in tuned_unet.items():
        module = key[:-1]
        if key[-1] == "kernel" and ATTENTION_KERNEL.search("/".join(module)):
            down, up = adapters[(*module, lora.DOWN)], adapters[(*module, lora.UP)]
            change = scale * np.tensordot(down, up, axes=1)
            np.testing.assert_allclose(value, base_unet[key] + change, rtol=1e-6, atol=1e-7)
            assert not np.array_equal(value, base_unet[key]), key
            adapted += 1
        else:
            np.testing.assert_array_equal(value, base_unet[key], err_msg=str(key))
    assert adapted == len(adapters) // 2
    for part in ("autoencoder", "text_encoder"):
        _assert_trees_equal(tuned.params[part], base.params[part])


def _lora_steps(config, model, base_params, mesh, batches):
    """``finetune.stage_functions``' step jitted as the trainer jits it, run on ``batches``:
    returns (the initial adapters on the host, the final state, the frozen base params)."""
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    init_fn, step_fn = finetune.stage_functions(config, model)
    state, shardings = sharding.create_sharded(init_fn, mesh, rules, jax.random.key(0))
    initial = _flat(state.params)
    frozen = finetune.frozen_params(config, base_params, model)
    step = jit_train_step(step_fn, shardings, mesh, frozen_inputs.shardings_of(frozen))
    with jax.set_mesh(mesh):
        for batch in batches:
            batch = jax.device_put(batch, sharding.batch_sharding(mesh))
            state, _ = step(state, batch, jax.random.key(1), frozen)
    return initial, state, frozen


@pytest.mark.slow
def test_fsdp_lora_steps_shard_the_base_and_match_one_device(base_workdir, tmp_path):
    config = _lora_config(base_workdir)
    config.mesh.data, config.mesh.fsdp = 1, 8
    base = load_model(str(base_workdir), finetuned.base_config(config))
    assert dict(base.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}

    source = finetune.training_source(config, str(tmp_path), base, base.mesh)
    batch_size, num_steps = config.finetune.train.batch_size, 3
    batches = []
    for start in range(0, num_steps * batch_size, batch_size):
        records = [source[i] for i in range(start, start + batch_size)]
        batch = {
            k: np.stack([r[k] for r in records])
            for k in ("latent_mean", "latent_std", "loss_weight")
        }
        captions = [str(r["caption"]) for r in records]
        batch["tokens"] = tokenizer_lib.encode(
            base.tokenizer, captions, config.data.max_caption_length
        )
        batches.append(batch)

    initial, sharded, frozen = _lora_steps(config, base.model, base.params, base.mesh, batches)
    one_device = mesh_lib.create_mesh(1, 1, 1, jax.devices()[:1])
    base_on_one = jax.device_put(sharding.to_host(base.params), sharding.replicated(one_device))
    initial_on_one, single, _ = _lora_steps(config, base.model, base_on_one, one_device, batches)

    # The frozen base is split over the 8 devices, not copied to each (the tiny U-Net's
    # widths, 16 and 32, divide by 8).
    unet_kernels = [x for x in jax.tree.leaves(frozen["unet"]) if x.ndim >= 2]
    largest = max(unet_kernels, key=lambda x: x.size)
    assert largest.addressable_shards[0].data.size * 8 == largest.size
    assert sum(x.size for x in unet_kernels if not x.sharding.is_fully_replicated) > 0.9 * sum(
        x.size for x in unet_kernels
    )
    # The optimizer state holds only the adapters' moments.
    adapters = sharded.params["lora"]["unet"]
    moments = [x for x in jax.tree.leaves(sharded.opt_state) if x.ndim > 0]
    assert {m.shape for m in moments} <= {x.shape for x in jax.tree.leaves(adapters)}
    assert sum(m.size for m in moments) == 2 * lora.num_params(adapters)

    assert int(sharded.step) == int(single.step) == num_steps
    ours, theirs = _flat(sharded.params), _flat(single.params)
    assert ours.keys() == theirs.keys() == initial.keys() == initial_on_one.keys()
    # Adam moves each value by about the learning rate per step, whatever its gradient's size,
    # so a value whose gradient is near zero moves by an amount that rounding in a sum of
    # another order changes (up to 0.15% of a step here): the tolerance is 1% of a step.
    step_size = config.finetune.train.learning_rate
    for key in ours:
        np.testing.assert_array_equal(initial[key], initial_on_one[key])
        np.testing.assert_allclose(
            ours[key], theirs[key], rtol=1e-5, atol=0.01 * step_size, err_msg=str(key)
        )
    ups = [v for k, v in theirs.items() if k[-1] == lora.UP]
    assert all(np.any(up != 0) for up in ups)  # the steps trained them


@pytest.mark.slow
def test_dreambooth_draws_class_images_once_and_trains_every_weight(base_workdir, tmp_path):
    config = load_config("finetune", f"dreambooth,{base_workdir}")
    config.data.num_train_examples = 4  # the instance images
    ft = config.finetune
    ft.instance_prompt, ft.class_prompt = "a sks circle", "a circle"
    ft.num_class_images, ft.prior_loss_weight = 6, 0.5
    ft.train_text_encoder = True
    ft.train.steps, ft.train.batch_size = 2, 8
    workdir = tmp_path / "dreambooth"
    finished, state = _run_finetune(config, workdir)
    assert finished

    class_images = sorted((workdir / "class_images").iterdir())
    assert [p.name for p in class_images] == [f"{i:05d}.png" for i in range(6)]
    drawn = {p.name: p.stat().st_mtime_ns for p in class_images}

    # Full fine-tuning trains the U-Net and the text encoder from the base's weights; the
    # step's frozen inputs hold neither.
    base = load_model(str(base_workdir))
    assert set(state.params) == {"unet", "text_encoder"}
    for part in ("unet", "text_encoder"):
        trained, original = _flat(state.params[part]), _flat(base.params[part])
        assert trained.keys() == original.keys()
        assert any(not np.array_equal(trained[k], original[k]) for k in trained), part
    assert set(finetune.frozen_params(config, base.params, base.model)) == {"autoencoder"}

    # A resumed run reads the class images the first one drew.
    source = finetune.training_source(config, str(workdir), base, base.mesh)
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "class_images").iterdir()} == drawn
    records = [source[i] for i in range(len(source))]
    # The 4 instance images repeated to 8 records (at least the 6 class images), weight 2;
    # the class images weight 2 * prior_loss_weight.
    assert [str(r["caption"]) for r in records] == ["a sks circle"] * 8 + ["a circle"] * 6
    assert [float(r["loss_weight"]) for r in records] == [2.0] * 8 + [1.0] * 6
    for i in range(4):
        np.testing.assert_array_equal(records[i]["latent_mean"], records[i + 4]["latent_mean"])
    assert not np.array_equal(records[0]["latent_mean"], records[1]["latent_mean"])


@pytest.mark.slow
def test_a_stopped_lora_run_resumes_to_the_uninterrupted_adapters(base_workdir, lora_run, tmp_path):
    config = _lora_config(base_workdir)
    workdir = tmp_path / "resumed"
    finished, stopped = _run_finetune(config, workdir, StopAtCall(3))
    assert not finished and int(stopped.step) == 3
    assert (workdir / "checkpoints" / "finetune" / "3").is_dir()
    finished, resumed = _run_finetune(config, workdir)
    assert finished
    _, straight = lora_run
    _assert_trees_equal(resumed, straight)  # step, adapters, their EMA and Adam's moments


@pytest.fixture
def fake_base(tmp_path):
    """A folder with a workdir's config.json (the tiny quickstart's) and nothing trained:
    enough for the config checks, which run before any weight is read."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(config_lib.to_json(load_config("quickstart", "tiny")))
    return base


@pytest.mark.parametrize(
    "change, key",
    [
        ({"stage": "finetune", "finetune.base": ""}, "config.finetune.base"),
        ({"finetune.base": "{empty_folder}"}, "config.finetune.base="),
        ({"finetune.class_prompt": "a circle"}, "config.finetune.class_prompt"),
        ({"finetune.lora.targets": ("attn1/(to_q",)}, "config.finetune.lora.targets"),
        (
            {"finetune.method": "full", "finetune.base_dtype": "bfloat16"},
            "config.finetune.base_dtype",
        ),
    ],
    ids=["no base", "base not a workdir", "class prompt alone", "bad regex", "bf16 full"],
)
def test_bad_finetune_settings_are_one_line_naming_the_key(fake_base, tmp_path, change, key):
    (tmp_path / "empty").mkdir()
    config = load_config("finetune", f"lora,{fake_base}")
    for name, value in change.items():
        value = value.format(empty_folder=tmp_path / "empty") if isinstance(value, str) else value
        *sections, leaf = name.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[leaf] = value
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config, jax.device_count())
    assert key in str(raised.value) and "\n" not in str(raised.value)


def test_lora_targets_matching_no_module_are_one_line_naming_the_key(base_workdir, tmp_path):
    config = _lora_config(base_workdir)
    config.finetune.lora.targets = ("no_such_module",)
    with pytest.raises(config_lib.ConfigError, match=r"config\.finetune\.lora\.targets") as raised:
        train(config, str(tmp_path / "run"))
    assert "no_such_module" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("lorra,{base}", "VARIANT one of lora, dreambooth, dreambooth_lora"),
        ("lora", "needs VARIANT,BASE_WORKDIR"),
        ("lora,{base}/missing", "missing is not a workdir (it holds no config.json)"),
    ],
    ids=["unknown variant", "no base", "base not a workdir"],
)
def test_finetune_config_file_errors_are_one_line(fake_base, tmp_path, capsys, arg, fragment):
    argv = [
        "ldm-jax",
        "train",
        f"--config={ROOT / 'configs' / 'finetune.py'}:{arg.format(base=fake_base)}",
        f"--workdir={tmp_path / 'run'}",
    ]
    with cli_session(argv), pytest.raises(SystemExit) as exited:
        cli.main(cli._parse_flags(argv))
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and "\n" not in error, error


def _cli(argv: list[str]) -> None:
    """``ldm-jax ARGV...`` in this process; fails the test on a non-zero exit."""
    argv = ["ldm-jax", *argv]
    with cli_session(argv):
        code = cli.main(cli._parse_flags(argv))
    assert code in (None, 0)


def _sample(workdir, out, *extra) -> np.ndarray:
    _cli(
        [
            "sample",
            f"--workdir={workdir}",
            "--prompt=a red circle",
            "--num_per_prompt=2",
            "--steps=3",
            f"--out={out}",
            *extra,
        ]
    )
    from PIL import Image

    return np.asarray(Image.open(out))


@pytest.mark.slow
def test_exported_lora_files_sample_as_the_finetune_workdir(base_workdir, lora_run, tmp_path):
    """A LoRA file exported in either layout and applied to the base with ``--lora`` draws
    exactly the fine-tune workdir's images; at scale 0 it draws the base's."""
    workdir, state = lora_run
    trained = sharding.to_host(state.ema_params["lora"]["unet"])
    for layout in ("diffusers", "kohya"):
        path = tmp_path / f"{layout}.safetensors"
        _cli(
            ["export", f"--workdir={workdir}", "--what=lora", f"--format={layout}", f"--out={path}"]
        )
        weights = lora_files.load_lora(path)
        assert (weights.rank, weights.alpha, weights.text_encoder) == (4, 4.0, None)
        _assert_trees_equal(weights.unet, trained)
    finetuned_images = _sample(workdir, tmp_path / "finetuned.png")
    base_images = _sample(base_workdir, tmp_path / "base.png")
    with_file = _sample(
        base_workdir, tmp_path / "file.png", f"--lora={tmp_path / 'kohya.safetensors'}"
    )
    at_zero = _sample(
        base_workdir, tmp_path / "zero.png", f"--lora={tmp_path}/diffusers.safetensors:0"
    )
    np.testing.assert_array_equal(with_file, finetuned_images)
    np.testing.assert_array_equal(at_zero, base_images)
    assert np.abs(finetuned_images.astype(int) - base_images).max() > 0


def test_lora_flag_errors_are_one_line_naming_the_file(base_workdir, tmp_path, capsys):
    other = tmp_path / "other.safetensors"  # made for a U-Net with other widths
    adapters = {
        "down_blocks_0": {
            "attentions_0": {
                "transformer_blocks_0": {
                    "attn1": {
                        "to_q": {
                            lora.DOWN: np.ones((7, 2), np.float32),
                            lora.UP: np.ones((2, 7), np.float32),
                        }
                    }
                }
            }
        }
    }
    lora_files.save_lora(other, lora_files.LoraWeights(adapters, None, 2, 2.0))
    for flag, fragment in [
        (f"{tmp_path}/missing.safetensors", "does not exist"),
        (f"{other}", "made for another model"),
        (f"{other}:strong", "is not a scale"),
    ]:
        argv = [
            "ldm-jax",
            "sample",
            f"--workdir={base_workdir}",
            "--prompt=a red circle",
            f"--lora={flag}",
        ]
        with cli_session(argv), pytest.raises(SystemExit) as exited:
            cli.main(cli._parse_flags(argv))
        assert exited.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and fragment in errors[0] and "--lora" in errors[0], errors
    argv = ["ldm-jax", "export", f"--workdir={base_workdir}", "--what=lora", f"--out={other}"]
    with cli_session(argv), pytest.raises(SystemExit):
        cli.main(cli._parse_flags(argv))
    assert "is not one" in capsys.readouterr().err


def test_a_bfloat16_base_keeps_small_updates():
    """With the base in bfloat16, an adapted kernel is computed in float32: an update far
    below bfloat16's resolution of the kernel is not rounded away."""
    kernel = np.full((4, 3), 1.0, np.float32)
    adapters = {
        "proj": {lora.DOWN: np.full((4, 1), 1e-3, np.float32), lora.UP: np.ones((1, 3), np.float32)}
    }
    params = {"proj": {"kernel": jax.numpy.asarray(kernel, jax.numpy.bfloat16)}}
    adapted = lora.adapted(params, [(adapters, 1.0)])["proj"]["kernel"]
    assert adapted.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(adapted), kernel + np.float32(1e-3))


@pytest.mark.slow
def test_lora_on_a_bfloat16_base_trains(base_workdir, tmp_path):
    config = _lora_config(base_workdir)
    config.finetune.base_dtype = "bfloat16"
    config.finetune.train.steps = 2
    finished, state = _run_finetune(config, tmp_path / "run")
    assert finished
    ups = [leaf for path, leaf in _flat(state.params).items() if path[-1] == lora.UP]
    assert ups and all(np.abs(up).max() > 0 for up in ups)
    base = load_model(str(base_workdir))
    frozen = finetune.frozen_params(config, base.params, base.model)
    assert {leaf.dtype for leaf in jax.tree.leaves(frozen["unet"])} == {
        np.dtype(jax.numpy.bfloat16)
    }
    assert {leaf.dtype for leaf in jax.tree.leaves(frozen["autoencoder"])} == {np.dtype(np.float32)}
