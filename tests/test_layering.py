"""The layers of the design hold: inference, evaluation, weight formats and the config never
reach the trainer, and lower layers never import higher ones."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ldm_jax"
# Layers 1-4 and the trained-model layer (5), bottom up; a package may import only its own
# layer and those below.
LAYERS = {
    "diffusion": 1,
    "models": 2,
    "parallel": 3,
    "data": 4,
    "config": 5,
    "checkpoint": 5,
    "interop": 5,
    "pipeline": 5,
    "train": 6,
    "evaluate": 6,
}
NEVER_TRAIN = ("config", "interop", "pipeline", "evaluate")


def _imported_packages(path: pathlib.Path, module: str | None = None) -> set[str]:
    """The ldm_jax packages a module (named ``module``, by default from its path) imports, at
    its top or inside functions."""
    module = module or ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: -node.level] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names = [name] + [f"{name}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ldm_jax" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


def _modules(package: str) -> list[pathlib.Path]:
    folder = PACKAGE / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{package}.py"]


@pytest.mark.parametrize("package", NEVER_TRAIN)
def test_inference_evaluation_formats_and_config_never_import_the_trainer(package):
    offenders = [p.name for p in _modules(package) if "train" in _imported_packages(p)]
    assert not offenders, f"{package}/ modules importing train/: {offenders}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_package_imports_a_higher_layer(package):
    for path in _modules(package):
        higher = {p for p in _imported_packages(path) if LAYERS[p] > LAYERS[package]}
        assert not higher, f"{path.relative_to(PACKAGE)} imports {higher}"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    """The check would catch a lazy import (as the commands make them)."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from ..train import run\n", encoding="utf-8")
    assert _imported_packages(module, "ldm_jax.pipeline.probe") == {"train"}
