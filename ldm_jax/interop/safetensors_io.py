"""Reading and writing safetensors files, and refusing every pickled format.

Weights come in as `{name: numpy array}` dicts in PyTorch's layout and naming; nothing on
any load path unpickles: `.ckpt`, `.pt`, `.pth` and `.bin` files (and any file whose first
bytes are a pickle or a zip archive, the format of `torch.save`) are refused with the
command that converts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from ldm_jax import storage

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# A pickle starts with the PROTO opcode 0x80; torch.save writes a zip archive ("PK").
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")

CONVERT_HINT = (
    "Pickled checkpoints can run arbitrary code when loaded, so ldm_jax never opens them. "
    "Convert it once, in an environment you trust, to safetensors:\n"
    '  python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('{path}', map_location='cpu', weights_only=True); "
    "sd = sd.get('state_dict', sd); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() "
    "if isinstance(v, torch.Tensor)}}, '{stem}.safetensors')\"\n"
    "(a diffusers or transformers directory converts with "
    "`save_pretrained(out_dir, safe_serialization=True)`)."
)


class PickleRefusedError(ValueError):
    """A pickled weights file was given; the message says how to convert it."""


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raises `PickleRefusedError` if `path` is a pickled (or torch zip) file."""
    path = os.fspath(path)
    file = storage.as_path(path)
    is_pickle = path.lower().endswith(PICKLE_SUFFIXES)
    if not is_pickle and file.is_file():
        with file.open("rb") as f:
            head = f.read(9)
        # A safetensors file starts with an 8-byte header length (any first byte, 0x80
        # included) followed by the JSON header's "{".
        is_safetensors = head[8:9] == b"{"
        is_pickle = not is_safetensors and any(head.startswith(m) for m in _PICKLE_MAGIC)
    if is_pickle:
        stem = os.path.splitext(path)[0]
        raise PickleRefusedError(
            f"{path} is a pickled checkpoint. " + CONVERT_HINT.format(path=path, stem=stem)
        )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, or of a sharded set through its index JSON.

    Args:
      path: a `.safetensors` file, or a `*.safetensors.index.json` index of shards, on a
        disk or in a bucket.

    Raises:
      FileNotFoundError: `path` does not exist.
      PickleRefusedError: `path` is a pickled checkpoint.
      ValueError: the file is not valid safetensors.
    """
    path = os.fspath(path)
    file = storage.as_path(path)
    if not file.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    refuse_pickle(path)
    if path.endswith(".index.json"):
        weight_map = json.loads(file.read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(storage.join(os.path.dirname(path), shard)))
        return tensors
    data = file.read_bytes()  # through epath (a bucket too), not by name in safetensors' Rust
    try:
        return safetensors.numpy.load(data)
    except Exception as error:  # safetensors raises its own untyped errors on bad headers
        raise ValueError(f"{path} is not a valid safetensors file: {error}") from error


def read_converter_input(path: str, flag: str) -> dict[str, np.ndarray]:
    """A converter's input: a safetensors file, or a torch state dict read with
    ``weights_only=True`` (torch's loader that rebuilds tensors only, never objects).

    Only the weight converters call this; every runtime load path refuses pickles.

    Raises:
        FileNotFoundError: naming ``flag`` when ``path`` is not a file.
        PickleRefusedError: torch's weights-only loader refused the pickle (it holds other
            objects than tensors and plain containers, or is corrupt), naming ``flag``.
    """
    file = storage.as_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{flag}={path} not found")
    try:
        refuse_pickle(path)
    except PickleRefusedError:
        import torch  # only the converters read pickles; the runtime never needs torch

        try:
            with file.open("rb") as f:
                state_dict = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises an UnpicklingError, among others
            raise PickleRefusedError(
                f"{flag}={path}: torch's weights-only loader refused this pickle "
                f"({' '.join(str(error).split())[:300]}); only a state dict of tensors is "
                f"read. Pass such a file, or a safetensors file."
            ) from error
        return {
            name: value.float().numpy()
            for name, value in state_dict.items()
            if isinstance(value, torch.Tensor)
        }
    return read_safetensors(path)


def write_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` (contiguous copies) to `path` (a file or a bucket object), creating
    its folder."""
    file = storage.as_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: np.require(value, requirements="C") for name, value in tensors.items()}
    file.write_bytes(
        safetensors.numpy.save(contiguous, metadata=dict(metadata or {"format": "pt"}))
    )


def find_weights_file(directory: str | os.PathLike, stems: tuple[str, ...]) -> str:
    """The safetensors weights in `directory`: `<stem>.safetensors` or its sharded index.

    Raises:
      FileNotFoundError: none found; the message lists what the directory has, and says
        when only pickled weights are there.
    """
    folder = storage.as_path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{os.fspath(directory)} is not a directory")
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            if (folder / name).is_file():
                return storage.join(directory, name)
    present = sorted(child.name for child in folder.iterdir())
    pickled = [name for name in present if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        refuse_pickle(storage.join(directory, pickled[0]))
    expected = ", ".join(f"{stem}.safetensors" for stem in stems)
    raise FileNotFoundError(f"no {expected} in {os.fspath(directory)} (it has: {present})")
