"""A grain source over a folder of image files, with optional classes and captions.

Layout::

    root/
      metadata.jsonl          optional: {"file_name": "cats/001.png", "text": "..."} lines
      cats/001.png            class "cats" (first-level subfolder; sorted names -> labels)
      cats/001.txt            optional caption of cats/001.png (wins over metadata.jsonl)
      dogs/puppies/002.jpg    class "dogs": deeper folders belong to their first level
      003.webp                at the root: label -1

Images are decoded to RGB: grayscale and palette images are expanded, and transparent
pixels are composited onto white. Every file is checked when the source is built; the ones
PIL cannot open are skipped with one warning. A file that passes the check but still fails
to decode when read is replaced by the next readable record (wrapping around) and counted
in ``decode_failures`` of the reading process, so one bad file never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_PATH_HINT = "set --config.data.path to a folder of images"
_NAMES_IN_WARNING = 5

logger = logging.getLogger(__name__)


def _is_readable_image(path: pathlib.Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many types for corrupt files.
        return False
    return True


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Returns the image as uint8 (H, W, 3), transparent pixels composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read_metadata_captions(root: pathlib.Path) -> dict[str, str]:
    """Returns captions by POSIX path relative to the root, from ``metadata.jsonl``."""
    metadata_path = root / METADATA_FILE
    if not metadata_path.is_file():
        return {}
    captions = {}
    with metadata_path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
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
    return captions


class ImageFolderSource:
    """A grain random-access source over the images under a folder.

    Records are ``{"image": uint8 (H, W, 3), "label": int32 scalar, "caption": str}``; the
    label is -1 for images at the root and the caption "" when none is given.

    Attributes:
        root: The folder.
        class_names: Sorted first-level subfolder names holding images; a label indexes it.
        num_unreadable: Files skipped because PIL could not open them.
        decode_failures: Records replaced since this process built or unpickled the source.
    """

    def __init__(self, path: str | os.PathLike):
        """Scans the folder and checks every image file.

        Args:
            path: The folder; it is searched recursively for png, jpg, jpeg, webp and bmp.

        Raises:
            FileNotFoundError: If ``path`` is not an existing folder.
            ValueError: If it holds no readable image, or ``metadata.jsonl`` is malformed.
        """
        self.root = pathlib.Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {os.fspath(path)!r} does not exist: {_PATH_HINT}."
            )
        candidates = sorted(
            file.relative_to(self.root)
            for file in self.root.rglob("*")
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file()
        )
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
                f"no readable image ({', '.join(IMAGE_EXTENSIONS)}) under {os.fspath(path)!r}: "
                f"{_PATH_HINT}."
            )
        self.class_names = sorted({file.parts[0] for file in self._files if len(file.parts) > 1})
        class_index = {name: index for index, name in enumerate(self.class_names)}
        self._labels = [
            class_index[file.parts[0]] if len(file.parts) > 1 else -1 for file in self._files
        ]
        metadata_captions = _read_metadata_captions(self.root)
        self._metadata_captions = [
            metadata_captions.get(file.as_posix(), "") for file in self._files
        ]
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self._files)

    def caption(self, index: int) -> str:
        """The caption of image `index`, read without decoding the image."""
        caption_file = (self.root / self._files[index]).with_suffix(".txt")
        if caption_file.is_file():
            return caption_file.read_text(encoding="utf-8").strip()
        return self._metadata_captions[index]

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images.")
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            try:
                with Image.open(self.root / self._files[candidate]) as image:
                    pixels = _to_rgb(image)
            except Exception:  # PIL raises many types for undecodable files.
                self.decode_failures += 1
                logger.warning("Cannot decode %s; reading the next image.", self._files[candidate])
                continue
            return {
                "image": pixels,
                "label": np.int32(self._labels[candidate]),
                "caption": self.caption(candidate),
            }
        raise ValueError(f"no image under {self.root} can be decoded: {_PATH_HINT}.")

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={os.fspath(self.root)!r})"
