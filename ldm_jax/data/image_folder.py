"""A grain source over a folder of image files, with optional classes and captions.

The folder may be on a disk or in a bucket (``gs://...``). Layout::

    root/
      metadata.jsonl          optional: {"file_name": "cats/001.png", "text": "..."} lines
      cats/001.png            class "cats" (first-level subfolder; sorted names -> labels)
      cats/001.txt            optional caption of cats/001.png (wins over metadata.jsonl)
      dogs/puppies/002.jpg    class "dogs": deeper folders belong to their first level
      003.webp                at the root: label -1

Images are decoded to RGB: grayscale (16-bit included) and palette images are expanded,
and transparent pixels are composited onto white. Every file is checked when the source is
built; the ones PIL cannot open are skipped with one warning. A file that passes the check
but still fails to decode when read is replaced by the next readable record (wrapping
around) and counted in ``decode_failures`` of the reading process, so one bad file never
stops training. Captions that are not valid UTF-8 are read with the undecodable bytes
replaced (U+FFFD), and counted in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterator

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from ldm_jax import storage

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_PATH_HINT = "set --config.data.path to a folder of images"
_NAMES_IN_WARNING = 5
# Integer grey modes of 16-bit files (PNG, TIFF): "I;16*", or "I" from older Pillows.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

logger = logging.getLogger(__name__)


def _files_under(folder: epath.Path) -> Iterator[pathlib.PurePosixPath]:
    """Every file under ``folder``, relative to it: one listing per subfolder, in a bucket too
    (whose listings also say which entries are folders)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from (pathlib.PurePosixPath(child.name) / file for file in _files_under(child))
        else:
            yield pathlib.PurePosixPath(child.name)


def _is_readable_image(path: epath.Path) -> bool:
    try:
        with path.open("rb") as file, Image.open(file) as image:
            image.verify()
    except Exception:  # PIL raises many types for corrupt files.
        return False
    return True


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Returns the image as uint8 (H, W, 3), transparent pixels composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY_MODES:
        # PIL clips these to 8 bits instead of scaling them: 16-bit grey would come out white.
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 2**16 - 1)
        image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read_metadata_captions(root: epath.Path) -> dict[str, str]:
    """Returns captions by POSIX path relative to the root, from ``metadata.jsonl``."""
    metadata_path = root / METADATA_FILE
    if not metadata_path.is_file():
        return {}
    captions = {}
    non_utf8_lines = []
    with metadata_path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            line, is_utf8 = _decode_text(raw_line)
            if not is_utf8:
                non_utf8_lines.append(line_number)
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                caption = entry["text"] if "text" in entry else entry["caption"]
                captions[pathlib.PurePosixPath(entry["file_name"]).as_posix()] = str(caption)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{metadata_path}:{line_number}: each line must be a JSON object with "
                    f'"file_name" and "text" (or "caption"): {error}'
                ) from error
    if non_utf8_lines:
        logger.warning(
            "%d line(s) of %s are not valid UTF-8 (e.g. line %d): read with the undecodable "
            "bytes replaced.",
            len(non_utf8_lines),
            metadata_path,
            non_utf8_lines[0],
        )
    return captions


def _decode_text(raw: bytes) -> tuple[str, bool]:
    """``raw`` as UTF-8 (a byte-order mark dropped), and whether it was valid UTF-8;
    invalid bytes become U+FFFD."""
    try:
        return raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), False


class ImageFolderSource:
    """A grain random-access source over the images under a folder.

    Records are ``{"image": uint8 (H, W, 3), "label": int32 scalar, "caption": str}``; the
    label is -1 for images at the root and the caption "" when none is given.

    Attributes:
        root: The folder (an ``epath.Path``: a local one made absolute, or a bucket URL).
        class_names: Sorted first-level subfolder names holding images; a label indexes it.
        num_unreadable: Files skipped because PIL could not open them.
        decode_failures: Records replaced since this process built or unpickled the source.
        non_utf8_captions: Caption files this process found not to be valid UTF-8 (each
            read with the undecodable bytes replaced, and counted and logged once).
    """

    def __init__(self, path: str | os.PathLike):
        """Scans the folder and checks every image file.

        Args:
            path: The folder; it is searched recursively for png, jpg, jpeg, webp and bmp.

        Raises:
            FileNotFoundError: If ``path`` is not an existing folder.
            ValueError: If it holds no readable image, or ``metadata.jsonl`` is malformed.
        """
        self._path = os.fspath(path)  # as given, for messages
        self.root = storage.as_path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self._path!r} does not exist: {_PATH_HINT}.")
        files = set(_files_under(self.root))
        candidates = sorted(file for file in files if file.suffix.lower() in IMAGE_EXTENSIONS)
        unreadable = [file for file in candidates if not _is_readable_image(self.root / file)]
        if unreadable:
            logger.warning(
                "Skipping %d unreadable image file(s) under %s, e.g. %s.",
                len(unreadable),
                self.root,
                ", ".join(file.as_posix() for file in unreadable[:_NAMES_IN_WARNING]),
            )
        self.num_unreadable = len(unreadable)
        unreadable_set = set(unreadable)
        self._files = [file for file in candidates if file not in unreadable_set]
        if not self._files:
            raise ValueError(
                f"no readable image ({', '.join(IMAGE_EXTENSIONS)}) under {self._path!r}: "
                f"{_PATH_HINT}."
            )
        self.class_names = sorted({file.parts[0] for file in self._files if len(file.parts) > 1})
        class_index = {name: index for index, name in enumerate(self.class_names)}
        self._labels = [
            class_index[file.parts[0]] if len(file.parts) > 1 else -1 for file in self._files
        ]
        # Caption files are found in the listing: reading a record asks no more of a bucket.
        self._has_caption_file = [file.with_suffix(".txt") in files for file in self._files]
        metadata_captions = _read_metadata_captions(self.root)
        self._metadata_captions = [
            metadata_captions.get(file.as_posix(), "") for file in self._files
        ]
        self.decode_failures = 0
        self._non_utf8_caption_files: set[int] = set()

    @property
    def non_utf8_captions(self) -> int:
        """Caption files this process found not to be valid UTF-8."""
        return len(self._non_utf8_caption_files)

    def __len__(self) -> int:
        return len(self._files)

    def caption(self, index: int) -> str:
        """The caption of image `index`, read without decoding the image."""
        if not self._has_caption_file[index]:
            return self._metadata_captions[index]
        caption_file = self.root / self._files[index].with_suffix(".txt")
        text, is_utf8 = _decode_text(caption_file.read_bytes())
        if not is_utf8 and index not in self._non_utf8_caption_files:
            self._non_utf8_caption_files.add(index)
            logger.warning(
                "Caption %s is not valid UTF-8: read with the undecodable bytes replaced "
                "(%d such caption file(s) so far).",
                caption_file,
                self.non_utf8_captions,
            )
        return text.strip()

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images.")
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            file = self.root / self._files[candidate]
            try:
                with file.open("rb") as stream, Image.open(stream) as image:
                    pixels = _to_rgb(image)
            except Exception:  # PIL raises many types for undecodable files.
                self.decode_failures += 1
                logger.warning(
                    "Cannot decode %s; reading the next image (%d image(s) replaced so far).",
                    file,
                    self.decode_failures,
                )
                continue
            return {
                "image": pixels,
                "label": np.int32(self._labels[candidate]),
                "caption": self.caption(candidate),
            }
        raise ValueError(f"no image under {self._path} can be decoded: {_PATH_HINT}.")

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={self._path!r})"
