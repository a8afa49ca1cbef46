"""A bad config value is one line naming its key, never a traceback from inside jax or flax.

Property tests (hypothesis, derandomised so CI sees the same examples every run) set one key
of the tiny quickstart config to values of every kind, in process and through the command
line, and run what training runs before its first step: ``validate``, the mesh, the config
file in the workdir and the abstract (``jax.eval_shape``) initialisation of both stages'
models and optimizers. Either that succeeds, or it ends in one ``ConfigError`` line that
names the key; any other exception fails the test.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import tempfile
import types

import jax
import ml_collections
import pytest
from conftest import cli_session, load_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ldm_jax import cli
from ldm_jax import config as config_lib
from ldm_jax.config import schema
from ldm_jax.diffusion import PREDICTION_TYPES, SAMPLERS, SCHEDULE_KINDS, TIMESTEP_SPACINGS
from ldm_jax.parallel import sharding
from ldm_jax.pipeline.generator import sampling_options
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import compile as compile_lib
from ldm_jax.train import diffusion as diffusion_stage
from ldm_jax.train import run
from ldm_jax.train import state as state_lib

PROPERTY_SETTINGS = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


@functools.cache
def _tiny_tree() -> dict:
    return load_config("quickstart", "tiny").to_dict()


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Every key a user sets: the leaves of the schema.
USER_KEYS = tuple(sorted(_leaf_keys(config_lib.base_config().to_dict())))
# Names the choice keys accept, so that a drawn string is sometimes a valid other choice.
CHOICE_WORDS = sorted(
    {
        *schema.STAGES,
        *schema.SOURCES,
        *schema.CONDITIONINGS,
        *schema.TEXT_ENCODER_KINDS,
        *schema.DTYPES,
        *schema.AUTOENCODER_KINDS,
        *schema.PIXEL_LOSSES,
        *SAMPLERS,
        *SCHEDULE_KINDS,
        *TIMESTEP_SPACINGS,
        *PREDICTION_TYPES,
        "inpaint",
        "sr",
        "full",
        "save_dots",
        "plain",
        "halt",
        "skip",
        "batch",
    }
)


def _default(key: str):
    node = _tiny_tree()
    for part in key.split("."):
        node = node[part]
    return node


def _with_value(key: str, value) -> ml_collections.ConfigDict:
    """The tiny config with ``config.<key> = value``, whatever its type (as a hand-edited
    config file or config.json can hold it)."""
    tree = copy.deepcopy(_tiny_tree())
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return ml_collections.ConfigDict(tree)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, 1e-9, 1e308]),
    st.text(max_size=6),
    st.sampled_from(CHOICE_WORDS),
)
ANY_VALUE = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4).map(tuple),
    st.lists(st.integers(-1, 64), max_size=5).map(tuple),
    st.lists(st.booleans(), max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)


def _near_default(key: str) -> st.SearchStrategy:
    """Values of the key's own type around its default: the ones most likely to be
    accepted, so that the model build after validation is exercised."""
    default = _default(key)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 2 * abs(default) + 8)
    if isinstance(default, float):
        return st.floats(-1.0, 2 * abs(default) + 2.0)
    if isinstance(default, str):
        return st.sampled_from(CHOICE_WORDS)
    return st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple)


def _value_for(key: str) -> st.SearchStrategy:
    """Any value one time in three, else one of the key's own type near its default."""
    return st.integers(0, 2).flatmap(lambda i: ANY_VALUE if i == 0 else _near_default(key))


KEY_AND_VALUE = st.sampled_from(USER_KEYS).flatmap(
    lambda key: st.tuples(st.just(key), _value_for(key))
)


def _abstract_stage(stage: str, config, workdir, mesh, rules, should_stop=None):
    """A stage trainer stopped before its first step: its model, optimizer and state are
    built abstractly (``jax.eval_shape``), as ``ldm-jax compile`` builds them."""
    del workdir, should_stop
    init_fn, *_ = compile_lib.stage_program(config, mesh, rules, stage)
    sharding.abstract_state(init_fn, mesh, rules, state_lib.init_key(config.seed, 1, mesh.size))
    if stage == "diffusion":
        sampling_options(config.sample)
    return types.SimpleNamespace(step=config[stage].train.steps)


@contextlib.contextmanager
def _stages_stop_before_training():
    """``run.train`` as it is, with each stage's trainer replaced by ``_abstract_stage``."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (autoencoder_stage, diffusion_stage):
            patch.setattr(module, "train", functools.partial(_abstract_stage, module.STAGE))
        yield


def _start_up(config) -> None:
    """What ``ldm-jax train`` does before its first step, in a throw-away workdir."""
    with tempfile.TemporaryDirectory() as workdir, _stages_stop_before_training():
        assert run.train(config, workdir)


def _assert_names_key(error: BaseException, key: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert f"config.{key}" in message, message


def _starts_or_refuses(config, key: str) -> None:
    """Starts up, or refuses the way the command line reports in one line (a ConfigError, or
    an OSError about the workdir's disk) naming ``key``."""
    try:
        _start_up(config)
    except (config_lib.ConfigError, OSError) as error:
        _assert_names_key(error, key)


def _starts_or_names_key(key: str, value) -> None:
    config = _with_value(key, value)
    try:
        config_lib.validate(config, jax.device_count())
    except config_lib.ConfigError as error:
        _assert_names_key(error, key)
        event("rejected by validation")
        return
    # Accepted: everything up to the first step must then work.
    event("accepted and built")
    _starts_or_refuses(config, key)


@PROPERTY_SETTINGS
@given(KEY_AND_VALUE)
def test_one_bad_value_is_one_line_naming_its_key(key_and_value):
    _starts_or_names_key(*key_and_value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("diffusion.train.batch_size", "64", "must be an integer in [1, 2**31 - 1]"),
        ("diffusion.train.batch_size", 0, "must be >= 1"),
        ("diffusion.train.batch_size", 2.0, "must be an integer"),
        ("diffusion.train.batch_size", True, "must be an integer"),
        ("diffusion.train.batch_size", None, "must be an integer"),
        ("autoencoder.train.learning_rate", float("nan"), "must be a positive number"),
        ("diffusion.train.learning_rate", -1e-4, "must be a positive number"),
        ("diffusion.train.steps", 2**31, "must be <= 2**31 - 1"),
        ("diffusion.train.grad_accum_steps", 3, "not divisible by"),
        ("diffusion.train.ema_decay", 1.0, "must be in [0, 1)"),
        ("train.log_every", 0, "must be >= 1"),
        ("train.checkpoint_every", -5, "must be >= 1"),
        ("train.sample_every", -1, "must be >= 0"),
        ("train.nonfinite", "ignore", "choose one of ('halt', 'skip')"),
        ("train.max_nonfinite_skips", -1, "must be >= 0"),
        ("train.max_nonfinite_skips", 1.5, "must be an integer in [0, 2**31 - 1]"),
        ("train.min_free_gib", -0.5, "must be >= 0"),
        ("train.min_free_gib", float("inf"), "must be a finite number >= 0"),
        ("mesh.tensor", 0, "must be a positive integer or -1"),
        ("mesh.fsdp", 3, "config.mesh.fsdp=3"),
        ("mesh.axis_rules", None, "(logical name, mesh axes) pairs"),
        ("mesh.axis_rules", (("batch", "x"),), "unknown mesh axes ['x']"),
        ("dtype", "float16", "choose one of ('float32', 'bfloat16')"),
        ("diffusion.unet.remat", "some", "choose one of ('none', 'full', 'save_dots')"),
        ("diffusion.schedule", None, "is not allowed"),
        ("sample.sampler", 3, "is not allowed"),
        ("sample.num_steps", 2000, "must be in [1, config.diffusion.num_timesteps=1000]"),
        ("sample.steps_offset", 999, "do not fit config.diffusion.num_timesteps=1000"),
        ("sample.eta", 2.0, "must be in [0, 1]"),
        ("data.image_size", 0, "must be >= 1"),
        ("data.image_size", "32", "must be an integer in [1, 16384]"),
        ("autoencoder.model.block_out_channels", (), "one or more integers"),
        ("autoencoder.model.block_out_channels", (16, -16), "one or more integers"),
        ("autoencoder.model.attention_levels", (True,), "one True/False per entry"),
        ("data.image_size", 34, "latents of size 17"),
        ("diffusion.unet.block_out_channels", (16, 32, 64), "needs one True/False per entry"),
        ("diffusion.unet.num_attention_heads", 3, "must divide the channels"),
        ("diffusion.unet.attention_head_dim", 5, "must divide every entry"),
        ("diffusion.unet.transformer_depth_per_level", (1,), "needs one entry per entry"),
        ("diffusion.unet.dropout", 1.0, "must be in [0, 1)"),
        ("diffusion.unet.freq_shift", 2, "must be <= 1"),
        ("diffusion.text_encoder.num_heads", 3, "must divide config.diffusion.text_encoder.width"),
        ("diffusion.beta_end", 1e-5, "must satisfy 0 < beta_start <= beta_end < 1"),
        ("diffusion.beta_start", 0.0, "must satisfy 0 < beta_start"),
        ("diffusion.cond_drop_prob", -0.1, "must be in [0, 1)"),
        ("autoencoder.loss.disc_weight", -1.0, "must be >= 0"),
        ("autoencoder.loss.disc_num_layers", 0, "must be >= 1"),
        ("autoencoder.model.mid_block_attention", "yes", "must be True or False"),
        ("data.random_flip", 1, "must be True or False"),
        ("data.path", None, "must be a string"),
        ("data.train_split", "", "must name the split"),
        ("seed", -1, "must be >= 0"),
    ],
)
def test_bad_value_is_named_with_what_is_allowed(key, value, message):
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(_with_value(key, value), num_devices=8)
    _assert_names_key(raised.value, key)
    assert message in str(raised.value)


def test_a_patch_gan_deeper_than_the_image_is_named():
    config = _with_value("autoencoder.loss.disc_weight", 0.5)
    config.autoencoder.loss.disc_num_layers = 4
    with pytest.raises(config_lib.ConfigError, match=r"disc_num_layers=4 halves"):
        config_lib.validate(config, num_devices=8)
    config.autoencoder.loss.disc_num_layers = 3  # a 2x2 grid of patches on 32x32 images
    _start_up(config)


def test_a_replaced_sub_config_names_the_missing_key():
    config = _with_value("diffusion.unet", {"a": 1})
    with pytest.raises(config_lib.ConfigError, match=r"config\.diffusion\.unet\.\w+ is missing"):
        config_lib.validate(config, num_devices=8)


# Values a user gives every key, each one checked through validation and the start-up path.
FIXED_BAD_VALUES = (None, True, -1, 0, 3, 1.5, float("nan"), "", "x", (), (7,), {"a": 1})
# The sections whose values shape the models come first in the budgeted builds.
BUILD_PRIORITY = ("diffusion.unet", "autoencoder.model", "diffusion.text_encoder", "autoencoder")
BUILD_COUNT = 6  # accepted configs started up, in a fixed order (about a second each)


def _build_priority(key: str) -> int:
    matches = [i for i, prefix in enumerate(BUILD_PRIORITY) if key.startswith(prefix)]
    return matches[0] if matches else len(BUILD_PRIORITY)


def test_every_key_with_each_fixed_bad_value():
    """Every user key x every value of ``FIXED_BAD_VALUES`` is validated; the distinct
    accepted configs then start up, those of the model sections first, ``BUILD_COUNT`` of them
    (the order is fixed, so CI is repeatable)."""
    accepted = {}
    for key in USER_KEYS:
        for value in FIXED_BAD_VALUES:
            config = _with_value(key, value)
            try:
                config_lib.validate(config, jax.device_count())
            except config_lib.ConfigError as error:
                _assert_names_key(error, key)
                continue
            accepted.setdefault(config_lib.to_json(config), (_build_priority(key), key, config))
    assert len(accepted) > 1  # the unchanged config and at least one other
    for _, key, config in sorted(accepted.values(), key=lambda entry: entry[:2])[:BUILD_COUNT]:
        _starts_or_refuses(config, key)


# ------------------------------------------------------------------------------------------
# The command line: `ldm-jax train` in process, parsed by absl and ml_collections.

TINY = "--config=configs/quickstart.py:tiny"


def _flag_value() -> st.SearchStrategy:
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8)
    return st.one_of(
        printable,
        st.integers(-5, 2**40).map(str),
        st.sampled_from(["None", "nan", "inf", "-inf", "True", "()", "(1,)", "(16, 32, 64)"]),
        st.sampled_from(["[]", "{}", "0", "-1", "1e9", "0.5", "'x'", "((1,2,3),)", "a\nb"]),
        st.sampled_from(CHOICE_WORDS),
    )


def _typo(key: str) -> st.SearchStrategy:
    """A misspelt key: a letter dropped or doubled, or an unknown leaf."""
    return st.one_of(
        st.integers(0, len(key) - 1).map(lambda i: key[:i] + key[i + 1 :]),
        st.integers(0, len(key) - 1).map(lambda i: key[:i] + key[i] + key[i:]),
        st.just(key + "s"),
    )


OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(USER_KEYS), _flag_value()),
    st.tuples(st.sampled_from(USER_KEYS).flatmap(_typo), _flag_value()),
).map(lambda kv: f"--config.{kv[0]}={kv[1]}")
COMMAND_LINES = st.one_of(
    # A good command with one or two bad overrides.
    st.lists(OVERRIDE, min_size=1, max_size=2).map(lambda o: [TINY, "--workdir={tmp}", *o]),
    # Without --config or --workdir, or with bad ones, or a misspelt flag.
    st.sampled_from(
        [
            ["--workdir={tmp}"],
            [TINY],
            [TINY, "--workdir="],
            ["--config=configs/none.py", "--workdir={tmp}"],
            ["--config=configs/quickstart.py:huge", "--workdir={tmp}"],
            ["--config=README.md", "--workdir={tmp}"],
            ["--config=configs", "--workdir={tmp}"],
            [TINY, "--workdir={tmp}/config.json/sub"],
            [TINY, "--wrokdir={tmp}"],
            [TINY, "--workdir={tmp}", "--config.train"],
            [TINY, "--workdir={tmp}", "--config.diffusion.unet={}"],
            [TINY, "--workdir={tmp}", "--num_processes=x"],
            ["--workdir={tmp}", TINY, "--config.data.image_size=40"],
        ]
    ),
)


def _run_cli(args: list[str]) -> tuple[int, str]:
    """``ldm-jax train ARGS`` as ``app.run`` calls it; returns (exit code, stderr)."""
    argv = ["ldm-jax", "train", *args]
    stderr = io.StringIO()
    with cli_session(argv), _stages_stop_before_training():
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main(cli._parse_flags(argv))
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    return code, stderr.getvalue()


def _assert_clean_outcome(code: int, stderr: str) -> None:
    if code == 0:
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ldm-jax"), stderr
    assert "Traceback" not in stderr, stderr


@PROPERTY_SETTINGS
@given(COMMAND_LINES)
def test_command_line_ends_cleanly_or_in_one_line(args):
    with tempfile.TemporaryDirectory() as tmp:
        open(f"{tmp}/config.json", "w").close()  # a file where --workdir wants a directory
        code, stderr = _run_cli([a.replace("{tmp}", tmp) for a in args])
        event(f"exit code {code}")
        _assert_clean_outcome(code, stderr)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--workdir={tmp}"], "--config is required"),
        ([TINY], "--workdir is required"),
        ([TINY, "--workdir={tmp}", "--config.diffusion.train.batch_size=abc"], "batch_size=abc"),
        ([TINY, "--workdir={tmp}", "--config.diffusion.train.batch_size=-8"], "must be >= 1"),
        ([TINY, "--workdir={tmp}", "--config.train.nonfinite=never"], "config.train.nonfinite"),
        ([TINY, "--workdir={tmp}", "--config.train.min_free_gib=nan"], "config.train.min_free"),
        ([TINY, "--workdir={tmp}", "--config.sample.samplr=ddim"], "config.sample.samplr"),
        ([TINY, "--workdir={tmp}", "--config.diffusion.unet={}"], "is missing"),
        (["--config=configs/quickstart.py:huge", "--workdir={tmp}"], "unknown variant 'huge'"),
        (["--config=README.md", "--workdir={tmp}"], "SyntaxError"),
        (["--config=configs/none.py", "--workdir={tmp}"], "configs/none.py"),
        (
            [TINY, "--workdir={tmp}", "--config.diffusion.unet.block_out_channels=a\nb"],
            "('a\\nb',)",
        ),
    ],
)
def test_command_line_error_is_one_line(tmp_path, args, fragment):
    code, stderr = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, stderr
    _assert_clean_outcome(code, stderr)
    assert fragment in stderr, stderr


def test_command_line_that_is_right_starts_training(tmp_path):
    code, stderr = _run_cli([TINY, f"--workdir={tmp_path}", "--config.data.image_size=48"])
    assert code == 0, stderr
    saved = config_lib.load_workdir_config(str(tmp_path))
    assert saved.data.image_size == 48
    assert math.isclose(saved.diffusion.train.learning_rate, 8e-4)
