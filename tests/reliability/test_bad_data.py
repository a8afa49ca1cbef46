"""Bad, odd and small image files, non-UTF-8 captions and empty folders in an image folder.

Every readable image reaches training as uint8 RGB of the configured size, whatever its
mode or bit depth; the files that cannot be read are skipped and counted in the log; a
caption that is not UTF-8 is read with its undecodable bytes replaced, and counted; a folder
with no readable image is one clear error naming the folder and the config key.
"""

import io
import json
import logging
import pathlib
import re
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.data.image_folder import ImageFolderSource
from ldm_jax.data.tokenizer import UNK_ID
from ldm_jax.data.transforms import ResizeAndCrop
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.train import data as data_lib

IMAGE_SIZE = 32
WHITE, RED, BLUE, GREEN = (255, 255, 255), (255, 0, 0), (0, 0, 255), (10, 200, 10)
GREY = (128, 128, 128)


@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch):
    """The CLI's logging set-up (run by other tests in this process) stops ``ldm_jax`` logs
    from propagating to the root logger, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("ldm_jax"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("ldm_jax"), "disabled", False)


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG of (H, W, 1 | 3 | 4) uint16 pixels (PIL writes none in RGB)."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + png


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    """The file PIL writes for `image` in `format`."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _noise(height: int, width: int) -> Image.Image:
    """A photo-like RGB image of random pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _palette() -> Image.Image:
    """A palette ("P") image whose every pixel is palette entry 1, red."""
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    return image


def _transparent_rgba() -> Image.Image:
    """Blue pixels, all fully transparent: composited onto white."""
    image = Image.new("RGBA", (40, 40), (*BLUE, 255))
    image.putalpha(0)
    return image


# {file name: (its bytes, the colour every training pixel has, or None for a photo)}
CONVERTIBLE = {
    "rgb.jpg": (_encoded(_noise(40, 48), "JPEG"), None),
    "grey.png": (_encoded(Image.new("L", (40, 36), 90), "PNG"), (90, 90, 90)),
    "grey_alpha.png": (_encoded(Image.new("LA", (40, 40), (90, 0)), "PNG"), WHITE),
    "rgba.png": (_encoded(Image.new("RGBA", (36, 40), (*BLUE, 255)), "PNG"), BLUE),
    "transparent.webp": (_encoded(_transparent_rgba(), "WEBP", lossless=True), WHITE),
    "palette.bmp": (_encoded(_palette(), "BMP"), RED),
    "bilevel.png": (_encoded(Image.new("1", (40, 40), 1), "PNG"), WHITE),
    "cmyk.jpg": (_encoded(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG"), WHITE),
    # 16-bit grey ("I;16"): 0x8000 of 0xFFFF is 128 of 255, not clipped to white.
    "grey16.png": (_encoded(Image.fromarray(np.full((40, 40), 2**15, np.uint16)), "PNG"), GREY),
    "rgb48.png": (_png16(np.tile(np.array([0xFFFF, 0, 0], np.uint16), (40, 40, 1))), RED),
    "rgba64.png": (_png16(np.tile(np.array([0, 0, 0xFFFF, 0xFFFF], np.uint16), (4, 4, 1))), BLUE),
    "small.png": (_encoded(Image.new("RGB", (8, 8), GREEN), "PNG"), GREEN),
}
_PNG, _JPEG = _encoded(_noise(32, 32), "PNG"), _encoded(_noise(32, 32), "JPEG")
# Files no image can be read from, found when the folder is scanned.
UNREADABLE = {
    "truncated.png": _PNG[: len(_PNG) // 2],
    "random.png": np.random.default_rng(1).bytes(600),
    "empty.png": b"",
    "text.jpg": b"not an image at all",
}
# A JPEG cut short passes PIL's check and fails only when decoded, while training.
UNDECODABLE = {"truncated.jpg": _JPEG[: len(_JPEG) // 2]}


def _write_folder(root: pathlib.Path, files: dict[str, bytes], captions: bool = True):
    """Writes the image files, each with its name as its caption (`name.txt`)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
        if captions:
            (root / name).with_suffix(".txt").write_text(name)
    return root


@pytest.fixture
def mixed_folder(tmp_path):
    """Every convertible, unreadable and undecodable kind of file in one folder."""
    images = {name: data for name, (data, _) in CONVERTIBLE.items()}
    return _write_folder(tmp_path / "images", {**images, **UNREADABLE, **UNDECODABLE})


def _data_config(path) -> ml_collections.ConfigDict:
    """The data config of a run training on the image folder at `path`."""
    data = config_lib.base_config().data
    data.source, data.path, data.image_size = "image_folder", str(path), IMAGE_SIZE
    return data


def test_unreadable_files_are_skipped_and_counted_with_an_example(mixed_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        source = make_source(_data_config(mixed_folder), "train", seed=0)
    assert source.num_unreadable == len(UNREADABLE)
    assert len(source) == len(CONVERTIBLE) + len(UNDECODABLE)
    (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert f"Skipping {len(UNREADABLE)} unreadable image file(s) under {mixed_folder}" in warning
    assert any(name in warning for name in UNREADABLE), warning


def test_every_convertible_image_becomes_rgb_of_the_configured_size(mixed_folder, caplog):
    source = make_source(_data_config(mixed_folder), "train", seed=0)
    resize = ResizeAndCrop(IMAGE_SIZE, random_crop=False)
    seen = set()
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        for index in range(len(source)):
            record = resize.random_map(source[index], np.random.default_rng(index))
            image, name = record["image"], record["caption"]
            assert image.dtype == np.uint8 and image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), name
            colour = CONVERTIBLE[name][1]
            if colour is not None:  # every pixel, within rounding
                assert np.abs(image.astype(int) - colour).max() <= 2, (name, image[0, 0])
            seen.add(name)
    assert seen == set(CONVERTIBLE)  # the truncated JPEG was replaced by the next image
    assert source.decode_failures == 1
    (warning,) = [r.getMessage() for r in caplog.records if "Cannot decode" in r.getMessage()]
    assert "truncated.jpg" in warning and "1 image(s) replaced so far" in warning


def test_training_batches_from_a_folder_of_bad_files_are_whole(mixed_folder):
    data = _data_config(mixed_folder)
    source = make_source(data, "train", seed=0)
    _, batches = data_lib.make_batches(
        data, source, batch_size=8, seed=0, mesh=mesh_lib.create_mesh(data=-1)
    )
    for _ in range(3):  # more than an epoch: the undecodable JPEG is drawn at least once
        images = np.asarray(next(batches)["image"])
        assert images.dtype == np.uint8 and images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert source.decode_failures >= 1


def test_a_caption_that_is_not_utf8_is_read_with_replacements_and_counted(tmp_path, caplog):
    images = {"a.png": CONVERTIBLE["grey.png"][0]}
    folder = _write_folder(tmp_path / "images", images, captions=False)
    (folder / "a.txt").write_bytes("un café noir\n".encode("latin-1"))
    _write_folder(folder, {"b.png": CONVERTIBLE["rgba.png"][0]})
    source = ImageFolderSource(folder)
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        assert source[0]["caption"] == "un caf\ufffd noir"
        assert source.caption(0) == "un caf\ufffd noir"  # read again: counted once
        assert source[1]["caption"] == "b.png"
    assert source.non_utf8_captions == 1
    (warning,) = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert str(folder / "a.txt") in warning and "1 such caption file(s)" in warning
    # The run's tokenizer is built from every caption, the replaced one included.
    tokenizer = data_lib.load_or_build_tokenizer(str(tmp_path), _data_config(folder), source)
    assert UNK_ID not in tokenizer.encode("un caf\ufffd noir").ids


def test_a_metadata_line_that_is_not_utf8_is_read_with_replacements(tmp_path, caplog):
    images = {"a.png": CONVERTIBLE["grey.png"][0], "b.png": CONVERTIBLE["rgba.png"][0]}
    folder = _write_folder(tmp_path / "images", images, captions=False)
    lines = [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "été"}]
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    (folder / "metadata.jsonl").write_bytes(text.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        source = ImageFolderSource(folder)
    assert [source.caption(0), source.caption(1)] == ["x", "\ufffdt\ufffd"]
    (warning,) = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert "1 line(s)" in warning and "line 2" in warning and "metadata.jsonl" in warning


@pytest.mark.parametrize(
    "files",
    [{}, {"notes.txt": b"no images here"}, UNREADABLE],
    ids=["empty", "no image files", "only unreadable images"],
)
def test_a_folder_without_a_readable_image_is_one_clear_error(tmp_path, files):
    folder = _write_folder(tmp_path / "images", files, captions=False)
    (folder / "empty_subfolder").mkdir()
    with pytest.raises(ValueError) as error:
        make_source(_data_config(folder), "train", seed=0)
    message = str(error.value)
    assert "no readable image" in message and str(folder) in message, message
    assert "--config.data.path" in message, message


def test_an_image_that_never_decodes_is_one_clear_error_when_read(tmp_path):
    folder = _write_folder(tmp_path / "images", UNDECODABLE, captions=False)
    source = ImageFolderSource(folder)  # passes the scan
    with pytest.raises(ValueError, match=rf"no image under {re.escape(str(folder))} can be"):
        source[0]


def test_the_cli_reports_a_folder_of_broken_images_in_one_line(tmp_path):
    folder = _write_folder(tmp_path / "images", UNREADABLE, captions=False)
    result = run_cli(
        "train",
        "--config=configs/quickstart.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        "--config.data.source=image_folder",
        f"--config.data.path={folder}",
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "no readable image" in error and str(folder) in error and "--config.data.path" in error
