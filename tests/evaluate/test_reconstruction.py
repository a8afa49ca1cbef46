"""Reconstruction evaluation: analytic metrics, padding on any mesh, codebook statistics, files."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.evaluate.image_metrics import PSNR_CAP_DB
from ldm_jax.evaluate.reconstruction import evaluate_reconstruction
from ldm_jax.parallel.mesh import create_mesh

SIZE = 16
OFFSET = 10
NUM_CODES = 16


def _records(count: int, shapes=((SIZE, SIZE, 3),)) -> list[dict]:
    """Images in [0, 200] (an offset cannot overflow) whose top-left red value is their index."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        image = rng.integers(0, 200, shapes[i % len(shapes)]).astype(np.uint8)
        image[0, 0, 0] = i
        records.append({"image": image, "label": i})
    return records


def _identity(params, images):
    return images


def _add_offset(params, images):
    return images + jnp.uint8(OFFSET)


def _mean_absolute_difference(params, images, reconstructions):
    return jnp.mean(jnp.abs(images - reconstructions), axis=(1, 2, 3))


def _codes_from_index(params, images):
    """Each image's 4 x 4 code map is filled with its index: one code per image."""
    return jnp.broadcast_to(images[:, :1, :1, 0].astype(jnp.int32), (images.shape[0], 4, 4))


def _single_device_mesh():
    return create_mesh(-1, 1, 1, devices=jax.devices()[:1])


def test_identity_scores_the_psnr_cap_and_ssim_one_and_writes_files(tmp_path):
    # Records of two sizes, resized and centre-cropped to the model's size; 6 of 10 evaluated.
    records = _records(10, shapes=((24, 20, 3), (20, 30, 3)))
    results = evaluate_reconstruction(
        _identity,
        records,
        mesh=_single_device_mesh(),
        batch_size=4,
        out_dir=str(tmp_path),
        num_images=6,
        image_size=SIZE,
        grid_images=4,
        step=123,
    )
    assert results["num_images"] == 6
    assert results["psnr"] == pytest.approx(PSNR_CAP_DB) and results["psnr_std"] == 0
    assert results["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "lpips" not in results and "codebook_usage" not in results

    with open(tmp_path / "reconstruction.json", encoding="utf-8") as f:
        written = json.load(f)
    assert written == results
    assert set(written) == {"psnr", "psnr_std", "ssim", "ssim_std", "num_images", "step"}
    assert written["step"] == 123
    # Two rows (originals, reconstructions) of 4 tiles of 16 px with 2 px gaps.
    grid = np.asarray(Image.open(tmp_path / "reconstruction.png"))
    assert grid.shape == (2 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2 : 2 + SIZE], grid[SIZE + 4 : 2 * SIZE + 4])


def test_offset_metrics_are_analytic_and_equal_on_8_and_1_devices(tmp_path):
    # 13 images: 8 devices pad the second batch of 8 with 3 rows, 1 device the fourth of 4.
    records = _records(13)
    kwargs = dict(lpips_fn=_mean_absolute_difference, codes_fn=_codes_from_index)
    eight = evaluate_reconstruction(
        _add_offset,
        records,
        mesh=create_mesh(-1, 1, 1),
        batch_size=8,
        out_dir=str(tmp_path / "eight"),
        num_codes=NUM_CODES,
        **kwargs,
    )
    one = evaluate_reconstruction(
        _add_offset,
        records,
        mesh=_single_device_mesh(),
        batch_size=4,
        out_dir=str(tmp_path / "one"),
        num_codes=NUM_CODES,
        **kwargs,
    )
    assert eight["num_images"] == one["num_images"] == 13
    assert eight["psnr"] == pytest.approx(20 * np.log10(255 / OFFSET), rel=1e-6)
    assert eight["psnr_std"] == pytest.approx(0, abs=1e-4)
    # LPIPS sees images in [-1, 1]: the offset is OFFSET / 127.5 there.
    assert eight["lpips"] == pytest.approx(OFFSET / 127.5, rel=1e-5)
    assert 0 < eight["ssim"] < 1
    # Codes 0..12 once each: 13 of 16 codes used, uniformly. A counted padding row
    # (a repeat of image 12) would lower the perplexity.
    assert eight["codebook_size"] == NUM_CODES
    assert eight["codebook_usage"] == pytest.approx(13 / NUM_CODES)
    assert eight["codebook_perplexity"] == pytest.approx(13.0, rel=1e-9)
    assert_same_results(eight, one)
    grid = np.asarray(Image.open(tmp_path / "eight" / "reconstruction.png"))
    assert grid.shape == (2 * (SIZE + 2) + 2, 13 * (SIZE + 2) + 2, 3)  # all 13 < grid_images


def assert_same_results(actual: dict, expected: dict) -> None:
    """The same keys; numbers equal within float tolerance, anything else (the checkpoint
    step, None without a checkpoint) exactly."""
    assert set(actual) == set(expected)
    for key, want in expected.items():
        if isinstance(want, float):
            assert actual[key] == pytest.approx(want, rel=1e-6, abs=1e-6), key
        else:
            assert actual[key] == want, key


def test_two_processes_read_their_own_rows_and_agree_with_one(tmp_path):
    """2 JAX processes x 4 CPU devices give the results of one process with 8 devices."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(pid), str(port), str(tmp_path / f"process_{pid}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
    reads = [json.loads(stdout.splitlines()[-2]) for stdout, _ in outputs]
    results = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    # Process p reads rows [4p, 4p + 4) of each batch of 8; padding is not read again.
    assert reads == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12]]
    single = evaluate_reconstruction(
        _add_offset,
        _records(13),
        mesh=create_mesh(-1, 1, 1),
        batch_size=8,
        out_dir=str(tmp_path / "single"),
        lpips_fn=_mean_absolute_difference,
        codes_fn=_codes_from_index,
        num_codes=NUM_CODES,
    )
    for result in results:
        assert_same_results(result, single)
    assert sorted(os.listdir(tmp_path / "process_0")) == [
        "reconstruction.json",
        "reconstruction.png",
    ]
    assert not os.path.exists(tmp_path / "process_1")


class _RecordingSource(list):
    """Records that remember which indices were read."""

    def __init__(self, records):
        super().__init__(records)
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(index)
        return super().__getitem__(index)


def _run_worker(process_id: int, port: int, out_dir: str) -> None:
    """One of the processes of the two-process test; prints its reads and its results."""
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    source = _RecordingSource(_records(13))
    results = evaluate_reconstruction(
        _add_offset,
        source,
        mesh=create_mesh(-1, 1, 1),
        batch_size=8,
        out_dir=out_dir,
        lpips_fn=_mean_absolute_difference,
        codes_fn=_codes_from_index,
        num_codes=NUM_CODES,
    )
    print(json.dumps(source.reads))
    print(json.dumps(results))


def test_codes_outside_the_codebook_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"codes outside \[0, num_codes=8\)"):
        evaluate_reconstruction(
            _add_offset,
            _records(13),
            mesh=create_mesh(-1, 1, 1),
            batch_size=8,
            out_dir=str(tmp_path),
            lpips_fn=_mean_absolute_difference,
            codes_fn=_codes_from_index,
            num_codes=8,
        )


def test_bad_arguments_are_named(tmp_path):
    mesh = create_mesh(-1, 1, 1)
    with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple.*8"):
        evaluate_reconstruction(
            _identity, _records(3), mesh=mesh, batch_size=4, out_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="codes_fn needs num_codes"):
        evaluate_reconstruction(
            _identity,
            _records(3),
            mesh=mesh,
            batch_size=8,
            out_dir=str(tmp_path),
            codes_fn=_codes_from_index,
        )
    mixed = _records(2, shapes=((SIZE, SIZE, 3), (SIZE + 1, SIZE, 3)))
    with pytest.raises(ValueError, match=r"record 1 has an image of shape \(17, 16, 3\)"):
        evaluate_reconstruction(_identity, mixed, mesh=mesh, batch_size=8, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no images"):
        evaluate_reconstruction(_identity, [], mesh=mesh, batch_size=8, out_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


if __name__ == "__main__":
    _run_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
