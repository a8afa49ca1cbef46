import io
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.image_folder import ImageFolderSource

_RED = (200, 10, 10)


def _save(path, image: Image.Image, **save_options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)


def _truncated_jpeg() -> bytes:
    """A JPEG that passes PIL's verify but fails to decode."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture
def folder(tmp_path):
    """cats/ and dogs/ classes, one image at the root, every image mode, captions both ways."""
    _save(tmp_path / "cats" / "a.png", Image.new("RGB", (8, 6), _RED))
    (tmp_path / "cats" / "a.txt").write_text("a red cat\n")
    _save(tmp_path / "cats" / "b.JPG", Image.new("RGB", (8, 8), (0, 0, 0)), format="JPEG")
    _save(tmp_path / "dogs" / "deep" / "c.png", Image.new("L", (5, 5), 90))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    _save(tmp_path / "dogs" / "d.webp", rgba, format="WEBP", lossless=True, exact=True)
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, *_RED] + [0] * 762)
    _save(tmp_path / "e.bmp", palette)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.md").write_text("ignored")
    metadata = [
        {"file_name": "dogs/d.webp", "text": "a blue dog"},
        {"file_name": "e.bmp", "caption": "a palette"},
        {"file_name": "cats/a.png", "text": "loses to a.txt"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))
    return tmp_path


def test_classes_captions_and_rgb_conversion(folder, caplog):
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(folder)
    assert len(source) == 5 and source.class_names == ["cats", "dogs"]
    # Sorted by path: cats/a.png, cats/b.JPG, dogs/d.webp, dogs/deep/c.png, e.bmp.
    a, b, d, c, e = (source[index] for index in range(len(source)))
    assert [int(r["label"]) for r in (a, b, d, c, e)] == [0, 0, 1, 1, -1]
    assert all(r["image"].dtype == np.uint8 and r["image"].shape[-1] == 3 for r in (a, b, c, d))
    assert a["image"].shape == (6, 8, 3) and (a["image"] == _RED).all()
    assert [r["caption"] for r in (a, b, d, c, e)] == [
        "a red cat",
        "",
        "a blue dog",
        "",
        "a palette",
    ]
    assert (c["image"] == 90).all()  # grayscale expanded
    assert (d["image"][0, 0] == 255).all() and (d["image"][1, 1] == (0, 0, 255)).all()  # alpha
    assert (e["image"] == _RED).all()  # palette
    assert [source.caption(i) for i in range(len(source))] == [
        r["caption"] for r in (a, b, d, c, e)
    ]
    assert source.num_unreadable == 1
    assert "1 unreadable" in caplog.text and "broken.png" in caplog.text


def test_an_image_failing_to_decode_is_replaced_by_the_next(folder):
    (folder / "cats" / "0.jpg").write_bytes(_truncated_jpeg())
    source = ImageFolderSource(folder)
    assert len(source) == 6 and source.num_unreadable == 1
    record = source[0]  # cats/0.jpg: passes the check, fails to decode
    assert record["caption"] == "a red cat" and source.decode_failures == 1


def test_images_at_the_root_have_no_class(tmp_path):
    _save(tmp_path / "x.png", Image.new("RGB", (2, 2)))
    source = pickle.loads(pickle.dumps(ImageFolderSource(tmp_path)))
    assert source.class_names == [] and source[0]["label"] == -1 and source[0]["caption"] == ""


def test_missing_or_empty_folders_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*--config\.data\.path"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"no readable image.*--config\.data\.path"):
        ImageFolderSource(tmp_path)


def test_malformed_metadata_names_the_line(tmp_path):
    _save(tmp_path / "x.png", Image.new("RGB", (2, 2)))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:2"):
        ImageFolderSource(tmp_path)
