import io
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from gcs_emulator import emulated_bucket
from PIL import Image

from ldm_jax import storage
from ldm_jax.data.tfds_source import TfdsSource

_NUM_TRAIN = 5


def _pixels(index: int) -> np.ndarray:
    pixels = np.zeros((6, 7, 3), np.uint8)
    pixels[..., 0] = 40 * index
    pixels[index, :, 1] = 255
    return pixels


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class LdmJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images given as PIL images and as encoded bytes (numpy would need TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "gray": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                    "caption": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(_NUM_TRAIN), "test": self._generate_examples(2)}

    def _generate_examples(self, count: int):
        for index in range(count):
            gray = Image.fromarray(np.full((3, 3), 10 * index, np.uint8))
            yield (
                index,
                {
                    "image": Image.fromarray(_pixels(index))
                    if index % 2
                    else _png_bytes(_pixels(index)),
                    "gray": gray,
                    "label": index % 3,
                    "caption": f"example {index}",
                },
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    LdmJaxTinyCaptions(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


def test_round_trip_gives_the_common_record_format(data_dir):
    source = TfdsSource("ldm_jax_tiny_captions", "train", data_dir, caption_key="caption")
    assert len(source) == _NUM_TRAIN
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["caption"])
    for index, record in enumerate(records):
        np.testing.assert_array_equal(record["image"], _pixels(index))
        assert record["label"].dtype == np.int32 and record["label"] == index % 3
        assert record["caption"] == f"example {index}"
    restored = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(restored[0]["image"], source[0]["image"])


def test_grayscale_images_and_missing_label_and_caption(data_dir):
    source = TfdsSource("ldm_jax_tiny_captions", "test", data_dir, image_key="gray", label_key=None)
    record = source[0]
    assert record["image"].shape == (3, 3, 3) and record["label"] == -1
    assert record["caption"] == ""


def test_unknown_feature_is_named(data_dir):
    with pytest.raises(ValueError, match="caption_key='text'.*'caption'"):
        TfdsSource("ldm_jax_tiny_captions", "train", data_dir, caption_key="text")


@pytest.mark.parametrize("name", ["ldm_jax_tiny_captions", "no_such_dataset"])
def test_missing_dataset_names_the_config_keys_and_prepares_nothing(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=r"tfds_name.*tfds_data_dir"):
        TfdsSource(name, "train", str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_dataset_in_a_bucket_reads_as_from_a_disk(data_dir, tmp_path):
    with emulated_bucket(tmp_path) as bucket:
        storage.upload(data_dir, f"{bucket}/tfds")
        remote = TfdsSource("ldm_jax_tiny_captions", "train", f"{bucket}/tfds")
        local = TfdsSource("ldm_jax_tiny_captions", "train", data_dir)
        assert len(remote) == len(local) == _NUM_TRAIN
        for index in range(_NUM_TRAIN):
            np.testing.assert_array_equal(remote[index]["image"], local[index]["image"])
        assert remote.data_dir == f"{bucket}/tfds"
