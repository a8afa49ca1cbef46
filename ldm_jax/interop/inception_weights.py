"""FID Inception weights: convert the published file once, then load one safetensors file.

pytorch-fid publishes TensorFlow's 2015 FID Inception as a torchvision ``Inception3`` state
dict, ``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.*``). `convert_inception` writes it as one
safetensors file named and laid out as the Flax parameters of
``ldm_jax.models.inception.FIDInceptionV3`` (names joined with "."; the classifier is
dropped), so `load_inception` reads it without torch and without transposes:

    python -m ldm_jax.interop.inception_weights --pt=pt_inception-2015-12-05-6726825d.pth \\
        --out=inception_fid.safetensors

The converter alone opens the pickled input, with ``torch.load(weights_only=True)``; run it
once, in an environment you trust. An input already in safetensors is read as such.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

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
from ldm_jax.models.inception import MIN_IMAGE_SIZE, FIDInceptionV3

# The classifier (1008 TensorFlow classes) is not part of the pool features.
CLASSIFIER_PREFIX = "fc."
CONVERT_COMMAND = (
    "python -m ldm_jax.interop.inception_weights --pt=pt_inception-2015-12-05-6726825d.pth "
    "--out={out}"
)
FORMAT_METADATA = {"format": "flax", "model": "fid-inception-v3"}


def inception_param_shapes() -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor of the Inception weights file."""
    return dict(_param_shapes())


@functools.cache
def _param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Tracing the network takes seconds; its shapes never change.
    dummy = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), dummy)["params"]
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract), sep=".")
    return tuple((name, tuple(leaf.shape)) for name, leaf in flat.items())


def load_inception(
    path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32
) -> tuple[FIDInceptionV3, dict]:
    """Reads the Inception weights file written by `convert_inception`.

    Args:
      path: the safetensors file (flag ``--inception_weights``).
      dtype: compute dtype (params stay float32).

    Returns:
      ``(module, params)``, ready for ``module.apply({"params": params}, images)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      PickleRefusedError: ``path`` is pickled (the published ``.pth``).
      WeightsMismatchError: a tensor is missing, unexpected, of another shape or not
        floating point.
      Each message gives the conversion command.
    """
    path = os.fspath(path)
    command = CONVERT_COMMAND.format(out=path)
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(
            f"--inception_weights={path} not found. Write it from pytorch-fid's published "
            f"weights with: {command}"
        )
    try:
        refuse_pickle(path)
    except PickleRefusedError:
        out = os.path.splitext(path)[0] + ".safetensors"
        raise PickleRefusedError(
            f"--inception_weights={path} is a pickled checkpoint, which ldm_jax never opens at "
            f"run time. Convert it once, in an environment you trust: "
            + CONVERT_COMMAND.format(out=out)
        ) from None
    tensors = read_safetensors(path)
    flat = {}
    for name, shape in inception_param_shapes().items():
        if name not in tensors or tensors[name].shape != shape:
            found = tensors[name].shape if name in tensors else "missing"
            raise WeightsMismatchError(
                f"--inception_weights={path}: tensor {name!r} is {found}, expected shape "
                f"{shape}; it is not a file written by the Inception converter. Write one "
                f"with: {command}"
            )
        check_float_dtype(f"--inception_weights={path}: tensor {name!r}", tensors[name])
        flat[name] = np.asarray(tensors[name], dtype=np.float32)
    refuse_unexpected(
        tensors,
        flat,
        f"--inception_weights={path}",
        f"it is not a file written by the Inception converter. Write one with: {command}",
    )
    return FIDInceptionV3(dtype=dtype), flax.traverse_util.unflatten_dict(flat, sep=".")


def convert_inception(pt_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Writes the Inception weights file from pytorch-fid's published state dict.

    Args:
      pt_path: ``pt_inception-2015-12-05-6726825d.pth`` (or a safetensors file with the
        same tensors).
      out_path: the safetensors file to write (its folder is created).

    Raises:
      FileNotFoundError: the input does not exist.
      WeightsMismatchError: the input lacks a tensor or has one of another shape, naming it.
    """
    pt_path, out_path = os.fspath(pt_path), os.fspath(out_path)
    tensors = {
        name: value
        for name, value in read_converter_input(pt_path, "--pt").items()
        if not name.startswith(CLASSIFIER_PREFIX)
    }
    abstract = flax.traverse_util.unflatten_dict(
        {
            tuple(name.split(".")): jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in inception_param_shapes().items()
        }
    )
    params = torch_to_flax(
        tensors, abstract, ignore=("num_batches_tracked",), what=f"FID Inception ({pt_path})"
    )
    write_safetensors(
        flax.traverse_util.flatten_dict(params, sep="."), out_path, metadata=FORMAT_METADATA
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ldm_jax.interop.inception_weights --pt=... --out=...``."""
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.interop.inception_weights",
        description="Convert pytorch-fid's FID Inception weights to one safetensors file for "
        "ldm-jax evaluate --inception_weights.",
    )
    parser.add_argument(
        "--pt", required=True, help="pt_inception-2015-12-05-6726825d.pth (or safetensors)"
    )
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        convert_inception(args.pt, args.out)
    except (FileNotFoundError, WeightsMismatchError) as error:
        raise SystemExit(f"error: {error}") from None
    megabytes = storage.as_path(args.out).stat().length / 1e6
    print(f"wrote {args.out} ({len(inception_param_shapes())} tensors, {megabytes:.1f} MB)")


if __name__ == "__main__":
    main()
