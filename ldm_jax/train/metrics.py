"""Metrics to a JSON-lines file and TensorBoard event files in the workdir (process 0 only)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import jax
import numpy as np

from ldm_jax import storage

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends ``{"stage", "step", "time", **metrics}`` lines to ``workdir/metrics.jsonl`` and
    writes the same scalars to ``workdir/tensorboard/<stage>``."""

    def __init__(self, workdir: str, stage: str):
        self.stage = stage
        self._active = jax.process_index() == 0
        if not self._active:
            return
        from tensorboardX import SummaryWriter

        storage.register_tensorboard_writers()
        self._jsonl = storage.open_for_append(storage.join(workdir, METRICS_FILE))
        self._tensorboard = SummaryWriter(storage.join(workdir, "tensorboard", stage))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self._active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"stage": self.stage, "step": int(step), "time": time.time(), **scalars}
        self._jsonl.write((json.dumps(record) + "\n").encode("utf-8"))
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{self.stage}/{name}", value, step)

    def write_images(self, step: int, name: str, grid: np.ndarray) -> None:
        if self._active:
            self._tensorboard.add_image(f"{self.stage}/{name}", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tensorboard.close()
