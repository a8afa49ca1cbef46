"""Nothing a file or a config holds is ever run: no unpickling, no eval, no shell.

A static scan of the package; every load path fed a pickle that would create a marker file;
safetensors files that do not fit the model; sweep specs and config paths written as code.
"""

import ast
import dataclasses
import functools
import json
import pathlib
import pickle
import types
from collections.abc import Callable

import jax
import numpy as np
import pytest
import torch
from conftest import ROOT

from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import latent_cache
from ldm_jax.data.clip_tokenizer import ClipTokenizer
from ldm_jax.data.tokenizer import load_tokenizer
from ldm_jax.evaluate.inception_features import reference_features
from ldm_jax.evaluate.sweep_spec import parse_sweep
from ldm_jax.interop import inception_weights, lpips_weights, safetensors_io
from ldm_jax.interop.clip import load_clip_model, load_clip_text_encoder
from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.interop.diffusers import load_diffusers_vae, save_diffusers_vae
from ldm_jax.interop.safetensors_io import PickleRefusedError, read_safetensors, write_safetensors
from ldm_jax.interop.single_file import load_single_file
from ldm_jax.models import AutoencoderKL
from ldm_jax.pipeline import pretrained
from ldm_jax.pipeline.import_export import import_model

# ---------------------------------------------------------------------------------------------
# Static scan
# ---------------------------------------------------------------------------------------------
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
BUILTINS_THAT_RUN_CODE = {"eval", "exec", "compile"}
CODE_LOADERS = {"runpy.run_path", "runpy.run_module", "importlib.util.spec_from_file_location"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}
# No site is allowed: `--config=configs/NAME.py` (the user's own program) is loaded by
# ml_collections' `config_flags` in cli.py, outside this package; nothing else runs a path.


def _keyword(call: ast.Call, name: str, safe_value: object) -> str:
    """Whether keyword `name` is "absent", "safe" (the literal `safe_value`) or "other"."""
    node = next((k.value for k in call.keywords if k.arg == name), None)
    if node is None:
        return "absent"
    return "safe" if isinstance(node, ast.Constant) and node.value is safe_value else "other"


class _Scanner(ast.NodeVisitor):
    """Collects `(line, what)` findings of one module, import aliases resolved."""

    def __init__(self, tree: ast.Module):
        # (line, what) findings; local name -> full import name; names defined here.
        self.findings, self.aliases, self.defined = [], {}, set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    self.aliases[local] = alias.name if alias.asname else local
                    if alias.name.split(".")[0] in PICKLING_MODULES:
                        self.findings.append((node.lineno, f"import {alias.name}"))
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] in PICKLING_MODULES:
                    self.findings.append((node.lineno, f"from {node.module} import"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defined.add(node.name)

    def _full_name(self, node: ast.expr) -> str | None:
        attributes = []
        while isinstance(node, ast.Attribute):
            attributes.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None  # a method of a call's result, e.g. `jax.jit(f).lower(x).compile()`
        return ".".join([self.aliases.get(node.id, node.id), *reversed(attributes)])

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        name = self._full_name(node.func)
        what = self._danger(node, name) if name else None
        if what:
            self.findings.append((node.lineno, what))

    def _danger(self, node: ast.Call, name: str) -> str | None:
        if isinstance(node.func, ast.Name) and name in BUILTINS_THAT_RUN_CODE - self.defined:
            return f"{name}() of a string"
        if name in {f"builtins.{n}" for n in BUILTINS_THAT_RUN_CODE}:
            return f"{name}()"
        if name == "torch.load" and _keyword(node, "weights_only", True) != "safe":
            return "torch.load without weights_only=True"
        if name == "numpy.load" and _keyword(node, "allow_pickle", False) == "other":
            return "numpy.load with allow_pickle"
        if name.startswith("subprocess.") and _keyword(node, "shell", False) == "other":
            return f"{name} with shell=True"
        if name in {"os.system", "os.popen", "yaml.unsafe_load", "yaml.full_load"}:
            return f"{name}()"
        if name in {"yaml.load", "yaml.load_all"}:
            loader = [k.value for k in node.keywords if k.arg == "Loader"] + node.args[1:2]
            loader_name = self._full_name(loader[0]) if loader else None
            if (loader_name or "").rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                return f"{name} without a safe Loader"
        if name in {"__import__", "importlib.import_module"}:
            module = getattr(node.args[0], "value", None) if node.args else None
            if not isinstance(module, str) or module.split(".")[0] in PICKLING_MODULES:
                return f"{name} of {module!r}"
        if name in CODE_LOADERS or name.endswith(".exec_module"):
            return f"{name} runs a file's code"
        return None


def scan(source: str, path: str) -> list[str]:
    """The findings in one module's source as `path:line: what`, in line order."""
    scanner = _Scanner(tree := ast.parse(source, filename=path))
    scanner.visit(tree)
    return [f"{path}:{line}: {what}" for line, what in sorted(scanner.findings)]


BAD_SNIPPETS = {
    "import pickle": "import pickle",
    "from dill": "from dill import loads",
    "cloudpickle": "import numpy, cloudpickle",
    "joblib": "from joblib import load",
    "eval": "eval(text)",
    "compile": "compile(text, 'f', 'exec')",
    "builtins.eval": "import builtins\nbuiltins.eval(text)",
    "torch.load": "import torch\ntorch.load(path)",
    "torch.load weights_only=False": "import torch\ntorch.load(path, weights_only=False)",
    "from torch import load": "from torch import load\nload(path)",
    "np.load allow_pickle": "import numpy as np\nnp.load(path, allow_pickle=True)",
    "numpy.load allow_pickle flag": "import numpy\nnumpy.load(path, allow_pickle=flag)",
    "subprocess shell": "import subprocess\nsubprocess.run(command, shell=True)",
    "subprocess alias shell": "import subprocess as sp\nsp.Popen(command, shell=True)",
    "os.system": "import os\nos.system(command)",
    "yaml.load": "import yaml\nyaml.load(stream)",
    "yaml.load Loader": "import yaml\nyaml.load(stream, Loader=yaml.Loader)",
    "__import__": "__import__(name)",
    "__import__ pickle": "__import__('pickle').loads(data)",
    "import_module": "import importlib\nimportlib.import_module(name)",
    "runpy": "import runpy\nrunpy.run_path(path)",
}
SAFE_SNIPPETS = {
    "AOT compile": "import jax\njax.jit(f).lower(x).compile()",
    "compile module": "from ldm_jax.train import compile\ncompile.compile_for_topology(c, t)",
    "np.load": "import numpy as np\nnp.load(path)\nnp.load(path, allow_pickle=False)",
    "torch.load": "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "subprocess list": "import subprocess\nsubprocess.run(['ls', path], check=True)",
    "yaml safe": "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
    "literal import": "import importlib\nimportlib.import_module('json')",
    "find_spec": "import importlib.util\nimportlib.util.find_spec('libtpu')",
}


SNIPPETS = {f"flags {name}": (code, True) for name, code in BAD_SNIPPETS.items()}
SNIPPETS |= {f"passes {name}": (code, False) for name, code in SAFE_SNIPPETS.items()}


@pytest.mark.parametrize("snippet,bad", SNIPPETS.values(), ids=SNIPPETS.keys())
def test_the_scanner_flags_each_pattern_at_its_line_and_passes_safe_calls(snippet, bad):
    last_line = f"snippet.py:{snippet.count(chr(10)) + 1}"
    assert [f.split(": ")[0] for f in scan(snippet, "snippet.py")] == ([last_line] if bad else [])


def test_no_module_of_the_package_unpickles_evaluates_or_runs_a_shell():
    package = ROOT / "ldm_jax"
    files = sorted(package.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} modules under {package}"
    findings = [f for file in files for f in scan(file.read_text(), str(file.relative_to(package)))]
    assert not findings, "code that runs what a file holds:\n" + "\n".join(findings)


# ---------------------------------------------------------------------------------------------
# Every load path refuses pickles
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Evil:
    """Unpickled, creates the file `marker`: proof that a loader ran a pickle."""

    marker: pathlib.Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path):
    """The file the pickle creates when it is unpickled; no loader may make it appear."""
    path = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(Evil(path))).close()  # an open file, as `open` returns
    path.unlink()  # raises unless unpickling the payload created the file
    yield path
    assert not path.exists(), "a loader unpickled the file"


TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
CLIP_TEXT = {**TOWER, "vocab_size": 100, "max_position_embeddings": 8, "eos_token_id": 2}
CLIP = {"text_config": CLIP_TEXT, "vision_config": {**TOWER, "image_size": 32, "patch_size": 16}}
MERGES = b"#version: 0.2\n"
BPE_FILES = {"vocab.json": {"<|startoftext|>": 0, "<|endoftext|>": 1}, "merges.txt": MERGES}
NO_MESH = (None, None)  # weights are refused before the mesh would be used


def _config_with(key: str, value, config=None):
    """`config` (default: the base config) with the dotted `key` set to `value`."""
    config = config_lib.base_config() if config is None else config
    *sections, leaf = key.split(".")
    functools.reduce(lambda section, name: section[name], sections, config)[leaf] = value
    return config


def _latent_cache(root: pathlib.Path) -> None:
    """A one-record latent cache folder."""
    with latent_cache.LatentCacheWriter(str(root), 0, 1) as writer:
        writer.write({"latent_mean": np.zeros((2, 2, 4), np.float32), "caption": ""})
    metadata = {"latent_shape": [2, 2, 4], "latent_scale": 1.0, "keys": []}
    latent_cache.write_metadata(str(root), metadata)


def _fid_reference(root: pathlib.Path) -> Callable[[], object]:
    """Caches the FID reference features of a stand-in network; returns the cached read."""
    (weights := root / "inception.safetensors").write_bytes(b"weights")
    extractor = types.SimpleNamespace(
        weights_path=str(weights), of_source=lambda source, count, size: np.zeros((count, 4))
    )
    options = dict(workdir=str(root), description={"source": "x"}, count=2, image_size=8)
    read = functools.partial(reference_features, extractor, [{}, {}], **options)
    read()  # computes and caches
    return read


@dataclasses.dataclass(frozen=True)
class LoadPath:
    """A loader called with a folder `t`; the `file` (or glob) it reads; the valid files written
    `beside` it, `{path: bytes or JSON}`; a `setup` writing a cache (returning the call if None)."""

    file: str
    load: Callable[[pathlib.Path], object] | None
    beside: dict = dataclasses.field(default_factory=dict)
    setup: Callable[[pathlib.Path], object] | None = None


UNET_BIN = "unet/diffusion_pytorch_model.bin"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
AUTOENCODER_CONFIG = _config_with("autoencoder.pretrained", "vae")
UNET_CONFIG = _config_with("diffusion.unet.pretrained", "m.safetensors")
CLIP_CONFIG = _config_with("diffusion.text_encoder.pretrained", "te")
LOAD_PATHS = {
    "safetensors": LoadPath("w.safetensors", lambda t: read_safetensors(f"{t}/w.safetensors")),
    "safetensors shard": LoadPath(
        "s.safetensors",
        lambda t: read_safetensors(f"{t}/i.safetensors.index.json"),
        {"i.safetensors.index.json": {"weight_map": {"w": "s.safetensors"}}},
    ),
    "import diffusers": LoadPath(
        UNET_BIN,
        lambda t: import_model("diffusers", str(t), f"{t}/run"),
        {"model_index.json": {"unet": [], "vae": []}, "unet/config.json": {}},
    ),
    "single file .ckpt": LoadPath("m.ckpt", lambda t: load_single_file(t / "m.ckpt")),
    "import single file": LoadPath(
        "m.safetensors", lambda t: import_model("single-file", f"{t}/m.safetensors", str(t))
    ),
    "CLIP text encoder": LoadPath(
        "te/pytorch_model.bin",
        lambda t: load_clip_text_encoder(t / "te"),
        {"te/config.json": CLIP_TEXT},
    ),
    "CLIP score model": LoadPath("model.safetensors", load_clip_model, {"config.json": CLIP}),
    "config autoencoder.pretrained": LoadPath(
        VAE_WEIGHTS,
        lambda t: pretrained.load_autoencoder(AUTOENCODER_CONFIG, str(t), *NO_MESH),
        {"vae/config.json": {}},
    ),
    "config unet.pretrained": LoadPath(
        "m.safetensors", lambda t: pretrained.initial_unet_params(UNET_CONFIG, str(t))
    ),
    "config text_encoder.pretrained": LoadPath(
        "te/model.safetensors",
        lambda t: pretrained.load_clip(CLIP_CONFIG, str(t)),
        {"te/config.json": CLIP_TEXT},
    ),
    "Inception .pth": LoadPath("i.pth", lambda t: inception_weights.load_inception(t / "i.pth")),
    "LPIPS .pth": LoadPath("vgg.pth", lambda t: lpips_weights.load_lpips(t / "vgg.pth")),
    "CLIP vocab.json": LoadPath("vocab.json", ClipTokenizer.from_directory, {"merges.txt": MERGES}),
    "CLIP tokenizer_config.json": LoadPath(
        "tokenizer_config.json", ClipTokenizer.from_directory, BPE_FILES
    ),
    "CLIP tokenizer.json": LoadPath("tokenizer.json", ClipTokenizer.from_directory),
    "word tokenizer.json": LoadPath("tok.json", lambda t: load_tokenizer(t / "tok.json")),
    "latent cache shard": LoadPath(
        latent_cache.shard_file_name(0, 1, 0), latent_cache.LatentCacheSource, setup=_latent_cache
    ),
    "latent cache metadata": LoadPath(
        "metadata.json", latent_cache.LatentCacheSource, setup=_latent_cache
    ),
    "FID reference .npz": LoadPath("evaluate/fid_reference/*.npz", None, setup=_fid_reference),
}


def _plant(tmp: pathlib.Path, load_path: LoadPath, payload: bytes):
    """Writes the valid files, then the pickle; returns (the loader's call, the pickle)."""
    for name, content in load_path.beside.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (tmp / name).write_bytes(data)
    read = load_path.setup(tmp) if load_path.setup else None
    load = functools.partial(load_path.load, tmp) if load_path.load else read
    planted = next(tmp.glob(load_path.file), tmp / load_path.file)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(payload)
    return load, planted


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("load_path", LOAD_PATHS.values(), ids=LOAD_PATHS.keys())
def test_every_load_path_refuses_a_pickle_without_running_it(tmp_path, marker, load_path, protocol):
    load, planted = _plant(tmp_path, load_path, pickle.dumps([Evil(marker)], protocol=protocol))
    with pytest.raises((ValueError, OSError)) as error:  # the CLI's one-line errors
        load()
    message = str(error.value)
    assert not isinstance(error.value, FileNotFoundError), message  # it read the pickle
    assert "pickle" in message.lower() or str(planted.parent) in message, message


def test_a_pickled_workdir_config_is_refused_without_running_it(tmp_path, marker):
    (tmp_path / "config.json").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(ValueError):
        config_lib.load_workdir_config(str(tmp_path))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_file_of_a_checkpoint_is_unpickled(tmp_path, marker):
    """Each file of a checkpoint in turn replaced by a pickle (orbax warns): none is run."""
    state, directory = {"w": jax.numpy.arange(3.0)}, str(tmp_path / "ckpt")
    (checkpointer := Checkpointer(directory, async_checkpointing=False)).save(1, state)
    checkpointer.close()
    refused = []
    for file in sorted(p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()):
        original = file.read_bytes()
        file.write_bytes(pickle.dumps(Evil(marker)))
        restorer = Checkpointer(directory, async_checkpointing=False)
        try:
            restorer.restore(state)
        except Exception:  # any error will do, as long as nothing ran
            refused.append(file.name)
        finally:
            restorer.close()
        file.write_bytes(original)
    assert "_METADATA" in refused, refused  # the state's tree metadata is parsed as JSON


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "disguised.safetensors"])
def test_torch_zip_checkpoints_are_refused_at_run_time(tmp_path, name):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path := tmp_path / name)
    for load in (lambda: read_safetensors(str(path)), lambda: load_single_file(path)):
        with pytest.raises(PickleRefusedError, match="pickled checkpoint"):
            load()


def test_converters_read_torch_tensors_and_nothing_else(tmp_path, marker):
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "plain.pth")
    tensors = safetensors_io.read_converter_input(str(tmp_path / "plain.pth"), "--pt")
    np.testing.assert_array_equal(tensors["w"], np.ones((2, 3), np.float32))
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "zip_with_object.pth")
    (tmp_path / "raw_pickle.pth").write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2))
    for name in ("zip_with_object.pth", "raw_pickle.pth"):
        with pytest.raises(PickleRefusedError, match=rf"--pt=.*{name}.*weights-only"):
            safetensors_io.read_converter_input(str(tmp_path / name), "--pt")


# ---------------------------------------------------------------------------------------------
# Safetensors headers are checked against the model
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_vae_dir(tmp_path):
    """A diffusers AutoencoderKL folder of a tiny autoencoder (zero weights)."""
    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2)
    images, key = jax.ShapeDtypeStruct((1, 2, 2, 3), np.float32), jax.random.key(0)
    abstract = jax.eval_shape(vae.init, {"params": key, "sample": key}, images)["params"]
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    save_diffusers_vae(vae, params, str(tmp_path / "vae"), 0.18215)
    return tmp_path / "vae"


def _edit_weights(folder: pathlib.Path, changes: dict) -> None:
    """Sets (or, for None, deletes) tensors of the folder's weights file."""
    path = str(folder / "diffusion_pytorch_model.safetensors")
    tensors = {**read_safetensors(path), **changes}
    write_safetensors({k: v for k, v in tensors.items() if v is not None}, path)


CONV_IN, BIAS = "encoder.conv_in.weight", "encoder.conv_in.bias"
HEADER_FAULTS = {  # {fault: (changed tensors, what the message says)}
    "missing": ({BIAS: None}, ["1 missing", BIAS]),
    "unexpected": ({"encoder.extra.weight": np.zeros(2)}, ["1 unexpected", "encoder.extra.weight"]),
    "shape": ({CONV_IN: np.zeros((8, 3, 1, 1))}, [CONV_IN, "(8, 3, 1, 1)", "expects (8, 3, 3, 3)"]),
    "dtype": ({CONV_IN: np.zeros((8, 3, 3, 3), np.int32)}, [CONV_IN, "dtype int32", "float32"]),
}


@pytest.mark.parametrize("changes,fragments", HEADER_FAULTS.values(), ids=HEADER_FAULTS.keys())
def test_weights_that_do_not_fit_the_model_are_refused_naming_the_tensor(
    tiny_vae_dir, changes, fragments
):
    _edit_weights(tiny_vae_dir, changes)
    with pytest.raises(WeightsMismatchError) as error:
        load_diffusers_vae(str(tiny_vae_dir))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_half_precision_weights_still_load(tiny_vae_dir):
    _edit_weights(tiny_vae_dir, {CONV_IN: np.ones((8, 3, 3, 3), np.float16)})
    kernel = load_diffusers_vae(str(tiny_vae_dir)).params["encoder"]["conv_in"]["kernel"]
    assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 3, 8) and (kernel == 1).all()


METRIC_FAULTS = {  # {fault: (tensors, what the message says)}, the model having `a.kernel`
    "dtype": ({"a.kernel": np.zeros((2, 3), np.int32)}, ["'a.kernel'", "dtype int32"]),
    "unexpected": ({"a.kernel": np.zeros((2, 3)), "b": np.zeros(1)}, ["unexpected", "'b'"]),
}


@pytest.mark.parametrize("module", [inception_weights, lpips_weights], ids=["Inception", "LPIPS"])
@pytest.mark.parametrize("tensors,fragments", METRIC_FAULTS.values(), ids=METRIC_FAULTS.keys())
def test_metric_weights_files_are_checked_by_name_and_dtype(
    tmp_path, monkeypatch, module, tensors, fragments
):
    name = module.__name__.rsplit(".", 1)[-1].removesuffix("_weights")
    monkeypatch.setattr(module, f"{name}_param_shapes", lambda: {"a.kernel": (2, 3)})
    load, path = getattr(module, f"load_{name}"), tmp_path / "weights.safetensors"
    write_safetensors({"a.kernel": np.zeros((2, 3), np.float32)}, str(path))
    load(path)  # the file the model expects loads
    write_safetensors(tensors, str(path))
    with pytest.raises(WeightsMismatchError) as error:
        load(path)
    for fragment in [*fragments, str(path)]:
        assert fragment in str(error.value), str(error.value)


# ---------------------------------------------------------------------------------------------
# Sweep specs and config paths are data, never code
# ---------------------------------------------------------------------------------------------
SWEEP_INJECTIONS = [
    "steps=__import__('os').system('touch {m}')",
    "checkpoint=open('{m}','w')",
    "guidance=eval(\"open('{m}','w')\")",
    "seed=1 __import__('os').system('touch {m}')",
]


@pytest.mark.parametrize("spec", SWEEP_INJECTIONS)
def test_sweep_specs_are_parsed_never_evaluated(marker, spec):
    with pytest.raises(ValueError, match="--sweep"):
        parse_sweep(spec.format(m=marker))


PATH_INJECTIONS = ["$(touch {m})", "; touch {m}", "`touch {m}` #"]
VALIDATE = functools.partial(config_lib.validate, num_devices=8)
# Config fields that are paths, and what reads each (`validate`, or the weights loader).
CONFIG_PATHS = {
    "data.path": lambda c: VALIDATE(_config_with("data.source", "image_folder", c)),
    "data.latent_cache": VALIDATE,
    "autoencoder.loss.lpips_weights": VALIDATE,
    "autoencoder.pretrained": lambda c: pretrained.load_autoencoder(c, "/run", *NO_MESH),
    "diffusion.unet.pretrained": lambda c: pretrained.initial_unet_params(c, "/run"),
    "diffusion.text_encoder.pretrained": lambda c: pretrained.load_clip(c, "/run"),
}


@pytest.mark.parametrize("injection", PATH_INJECTIONS)
@pytest.mark.parametrize("key", CONFIG_PATHS, ids=CONFIG_PATHS.keys())
def test_config_paths_written_as_shell_are_just_missing_paths(tiny_config, marker, key, injection):
    value = injection.format(m=marker)
    with pytest.raises((OSError, ValueError)) as error:  # ConfigError is a ValueError
        CONFIG_PATHS[key](_config_with(key, value, tiny_config))
    assert value in str(error.value), str(error.value)


DIRECT_LOADS = {name: p.load for name, p in LOAD_PATHS.items() if p.load is not None}


@pytest.mark.parametrize("injection", PATH_INJECTIONS)
@pytest.mark.parametrize("load", DIRECT_LOADS.values(), ids=DIRECT_LOADS.keys())
def test_loaders_given_shell_as_a_folder_report_it_missing(marker, load, injection):
    value = injection.format(m=marker)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        load(pathlib.Path(value))
    assert value in str(error.value), str(error.value)
