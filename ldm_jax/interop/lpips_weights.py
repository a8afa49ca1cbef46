"""LPIPS weights: convert the published files once, then load one safetensors file.

LPIPS with VGG16 needs two published files: torchvision's ImageNet VGG16
(`vgg16-397923af.pth`, whose `features.{i}.weight`/`.bias` are the convolutions;
`classifier.*` is not used) and the lpips package's linear heads for 'vgg'
(`lpips/weights/v0.1/vgg.pth`, tensors `lin{k}.model.1.weight` of shape (1, C, 1, 1); other
tensors in that file are ignored).
`convert_lpips` turns them into one safetensors file named and laid out as the Flax
parameters of `ldm_jax.models.lpips.LPIPS` (see that module), so `load_lpips` reads it
without torch and without transposes:

    python -m ldm_jax.interop.lpips_weights --vgg=vgg16-397923af.pth --heads=vgg.pth \\
        --out=lpips_vgg.safetensors

The converter alone opens pickled (`.pth`) inputs, with `torch.load(weights_only=True)`;
run it once, in an environment you trust. Inputs already in safetensors are read as such.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import storage
from ldm_jax.interop.convert import (
    WeightsMismatchError,
    check_float_dtype,
    refuse_unexpected,
    torch_to_flax,
)
from ldm_jax.interop.safetensors_io import (
    PickleRefusedError,
    read_converter_input,
    read_safetensors,
    refuse_pickle,
    write_safetensors,
)
from ldm_jax.models.lpips import LPIPS, MIN_IMAGE_SIZE

VGG_PREFIX = "features."
# lpips' NetLinLayer is Sequential(Dropout, Conv2d) (Sequential(Conv2d) without dropout).
HEAD_NAME = re.compile(r"lin(\d)\.model\.\d\.weight")
CONVERT_COMMAND = (
    "python -m ldm_jax.interop.lpips_weights --vgg=vgg16-397923af.pth "
    "--heads=lpips/weights/v0.1/vgg.pth --out={out}"
)
FORMAT_METADATA = {"format": "flax", "model": "lpips-vgg16"}


def _abstract_params() -> dict:
    """LPIPS' parameter tree as (unboxed) `ShapeDtypeStruct`s."""
    dummy = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)["params"]
    return nn.meta.unbox(abstract)


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of every tensor of the LPIPS weights file, names joined with "."."""
    flat = flax.traverse_util.flatten_dict(_abstract_params(), sep=".")
    return {name: tuple(leaf.shape) for name, leaf in flat.items()}


def load_lpips(path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32) -> tuple[LPIPS, dict]:
    """Reads the LPIPS weights file written by `convert_lpips`.

    Args:
      path: the safetensors file.
      dtype: compute dtype of the VGG16 convolutions (params stay float32).

    Returns:
      `(module, params)`: an `LPIPS` module and its parameter tree of float32 numpy arrays,
      ready for `module.apply({"params": params}, images, references)`.

    Raises:
      FileNotFoundError: `path` does not exist.
      PickleRefusedError: `path` is a pickled file (the published `.pth` weights).
      WeightsMismatchError: a tensor is missing, unexpected, of another shape or not
        floating point.
      Each message gives the conversion command.
    """
    path = os.fspath(path)
    command = CONVERT_COMMAND.format(out=path)
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(
            f"LPIPS weights file {path} not found. Write it from the published VGG16 and LPIPS "
            f"weights with:\n  {command}"
        )
    try:
        refuse_pickle(path)
    except PickleRefusedError:
        raise PickleRefusedError(
            f"{path} is a pickled checkpoint, which ldm_jax never opens at run time. "
            f"Convert the published VGG16 and LPIPS 'vgg' weights once, in an environment you "
            f"trust, to the one safetensors file load_lpips reads:\n  "
            + CONVERT_COMMAND.format(out=os.path.splitext(path)[0] + ".safetensors")
        ) from None
    tensors = read_safetensors(path)
    flat = {}
    for name, shape in lpips_param_shapes().items():
        if name not in tensors:
            raise WeightsMismatchError(
                f"LPIPS weights file {path} has no tensor {name!r} (shape {shape}); it is not "
                f"a file written by the LPIPS converter. Write one with:\n  {command}"
            )
        if tensors[name].shape != shape:
            raise WeightsMismatchError(
                f"LPIPS tensor {name!r} in {path} has shape {tensors[name].shape}, expected "
                f"{shape}. Write the file again with:\n  {command}"
            )
        check_float_dtype(f"LPIPS tensor {name!r} in {path}", tensors[name])
        flat[name] = np.asarray(tensors[name], dtype=np.float32)
    refuse_unexpected(
        tensors,
        flat,
        f"LPIPS weights file {path}",
        f"it is not a file written by the LPIPS converter. Write one with:\n  {command}",
    )
    return LPIPS(dtype=dtype), flax.traverse_util.unflatten_dict(flat, sep=".")


def _convert_vgg(tensors: Mapping[str, np.ndarray], abstract_vgg: dict, path: str) -> dict:
    """torchvision's `features.{i}.*` into `VGG16Features`' `conv_{i}` parameters."""
    features = {name: value for name, value in tensors.items() if name.startswith(VGG_PREFIX)}
    if not features:
        raise WeightsMismatchError(
            f"--vgg={path} has no '{VGG_PREFIX}*' tensors (it has e.g. {sorted(tensors)[:5]}); "
            f"pass torchvision's VGG16 state dict (vgg16-397923af.pth)."
        )
    # Matched under torchvision's module names, so that errors name the file's tensors.
    torchvision_abstract = {
        name.replace("conv_", "features_", 1): leaf for name, leaf in abstract_vgg.items()
    }
    converted = torch_to_flax(features, torchvision_abstract, what=f"VGG16 ({path})")
    return {name.replace("features_", "conv_", 1): leaf for name, leaf in converted.items()}


def _convert_heads(tensors: Mapping[str, np.ndarray], abstract_heads: dict, path: str) -> dict:
    """The lpips package's `lin{k}.model.1.weight` into `LPIPS`' `lin_{k}` parameters."""
    heads = {}
    for name, value in tensors.items():
        match = HEAD_NAME.fullmatch(name)
        if not match:
            continue
        head = abstract_heads.get(f"lin_{match.group(1)}")
        if head is not None:
            # Checked here, to name the tensor as the file does and in its layout.
            expected = (1, head["kernel"].shape[0], 1, 1)
            if tuple(value.shape) != expected:
                raise WeightsMismatchError(
                    f"--heads={path}: tensor {name!r} has shape {tuple(value.shape)}, but "
                    f"VGG16's LPIPS head expects {expected}. Is it the 'vgg' heads file "
                    f"(not 'alex' or 'squeeze')?"
                )
        heads[f"lin.{match.group(1)}.weight"] = value
    if not heads:
        raise WeightsMismatchError(
            f"--heads={path} has no 'lin{{k}}.model.1.weight' tensors (it has e.g. "
            f"{sorted(tensors)[:5]}); pass the lpips package's lpips/weights/v0.1/vgg.pth."
        )
    return torch_to_flax(heads, abstract_heads, what=f"LPIPS heads ({path})")


def convert_lpips(
    vgg_path: str | os.PathLike, heads_path: str | os.PathLike, out_path: str | os.PathLike
) -> None:
    """Writes the LPIPS weights file from the published VGG16 and LPIPS head weights.

    Args:
      vgg_path: torchvision's VGG16 state dict (`vgg16-397923af.pth`, or a safetensors file
        with its `features.*` tensors).
      heads_path: the lpips package's 'vgg' heads (`lpips/weights/v0.1/vgg.pth`, or a
        safetensors file with its `lin{k}.model.1.weight` tensors).
      out_path: the safetensors file to write (its folder is created).

    Raises:
      FileNotFoundError: an input does not exist.
      WeightsMismatchError: an input lacks a tensor or has one of another shape, naming it.
    """
    vgg_path, heads_path, out_path = map(os.fspath, (vgg_path, heads_path, out_path))
    abstract = _abstract_params()
    vgg_tensors = read_converter_input(vgg_path, "--vgg")
    heads_tensors = read_converter_input(heads_path, "--heads")
    vgg_params = _convert_vgg(vgg_tensors, abstract["vgg"], vgg_path)
    abstract_heads = {name: value for name, value in abstract.items() if name != "vgg"}
    head_params = _convert_heads(heads_tensors, abstract_heads, heads_path)
    params = {"vgg": vgg_params, **head_params}
    write_safetensors(
        flax.traverse_util.flatten_dict(params, sep="."), out_path, metadata=FORMAT_METADATA
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ldm_jax.interop.lpips_weights --vgg=... --heads=... --out=...`."""
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.interop.lpips_weights",
        description="Convert the published VGG16 and LPIPS 'vgg' weights to one safetensors "
        "file for ldm_jax's perceptual loss.",
    )
    parser.add_argument(
        "--vgg", required=True, help="torchvision's vgg16-397923af.pth (or safetensors)"
    )
    parser.add_argument(
        "--heads", required=True, help="the lpips package's weights/v0.1/vgg.pth (or safetensors)"
    )
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        convert_lpips(args.vgg, args.heads, args.out)
    except (FileNotFoundError, WeightsMismatchError) as error:
        raise SystemExit(f"error: {error}") from None
    megabytes = storage.as_path(args.out).stat().length / 1e6
    print(
        f"wrote {args.out} ({len(lpips_param_shapes())} tensors, {megabytes:.1f} MB): "
        f"VGG16 features from {args.vgg}, LPIPS heads from {args.heads}"
    )


if __name__ == "__main__":
    main()
