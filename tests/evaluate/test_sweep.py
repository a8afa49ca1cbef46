"""Evaluation sweeps: the --sweep grammar, and a whole sweep through the CLI that re-runs
without redoing finished points."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TEST_XLA_FLAGS, run_cli
from PIL import Image

from ldm_jax.evaluate.sweep_results import summary_table, write_plots, write_rows
from ldm_jax.evaluate.sweep_spec import parse_sweep


def test_points_are_the_cartesian_product_with_typed_values():
    points = parse_sweep(
        "sampler=ddim,dpmpp_2m steps=10,25,50 guidance=1,3.5 checkpoint=latest,500"
    )
    assert len(points) == 2 * 3 * 2 * 2
    assert points[0] == {"sampler": "ddim", "steps": 10, "guidance": 1.0, "checkpoint": "latest"}
    assert points[-1] == {"sampler": "dpmpp_2m", "steps": 50, "guidance": 3.5, "checkpoint": 500}
    assert isinstance(points[0]["steps"], int) and isinstance(points[0]["guidance"], float)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "--sweep is empty"),
        ("steps", "is not key=v1,v2"),
        ("stepz=1,2", "key 'stepz' is unknown"),
        ("steps=1 steps=2", "given twice"),
        ("steps=2.5", "steps='2.5': must be sampling steps"),
        ("steps=0", "steps='0': must be at least 1"),
        ("sampler=euler", "sampler='euler': must be one of"),
        ("guidance=-1", "guidance='-1': must be a number at least 0"),
        ("guidance=nan", "guidance='nan'"),
        ("checkpoint=newest", "checkpoint='newest'"),
        ("steps=2,2", "listed twice"),
        ("steps=__import__('os')", "steps=\"__import__('os')\""),
    ],
)
def test_bad_specs_are_one_line_naming_the_flag(spec, fragment):
    with pytest.raises(ValueError, match="--sweep") as error:
        parse_sweep(spec)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_results_files_plots_and_table(tmp_path):
    rows = [
        {
            "settings": {"sampler": s, "steps": n, "guidance": 2.0},
            "metrics": {"fid": 10.0 / n, "shape_accuracy": 0.1 * n, "colour_accuracy/red": 1.0},
        }
        for s in ("ddim", "ldm")
        for n in (2, 5, 10)
    ]
    write_rows(str(tmp_path), rows, "sampler=ddim,ldm steps=2,5,10")
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "sampler,steps,guidance,fid,shape_accuracy,colour_accuracy/red"
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    plots = write_plots(str(tmp_path), rows, ["sampler", "steps"])
    assert [os.path.basename(p) for p in plots] == ["plot-fid.png", "plot-shape_accuracy.png"]
    with Image.open(plots[0]) as plot:
        assert plot.size == (720, 420) and np.asarray(plot.convert("L")).std() > 0
    table = summary_table(rows, ["sampler", "steps"]).splitlines()
    assert len(table) == 2 + len(rows) and "fid" in table[0] and "colour" not in table[0]


def _run_on_8_devices(*args):
    return subprocess.run(
        [sys.executable, "-m", "ldm_jax.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8",
        },
    )


@pytest.mark.slow
def test_sweep_end_to_end_on_8_devices_skips_finished_points_when_run_again(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    sweep = [
        "evaluate",
        f"--workdir={workdir}",
        "--sweep=sampler=ddim,dpmpp_2m steps=2,3,4 guidance=1,3",
        "--num_per_prompt=1",
    ]
    result = _run_on_8_devices(*sweep)
    assert result.returncode == 0, result.stderr
    out = workdir / "evaluate" / "sweep-sampler-steps-guidance"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 12
    settings = {
        (r["settings"]["sampler"], r["settings"]["steps"], r["settings"]["guidance"]) for r in rows
    }
    assert len(settings) == 12
    for row in rows:
        assert row["settings"]["checkpoint"] == 4
        assert row["metrics"]["num_samples"] == 18
        assert 0.0 <= row["metrics"]["shape_accuracy"] <= 1.0
        assert "fid" not in row["metrics"]
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 12
    assert len(list((out / "grids").glob("*.png"))) == 12
    assert (out / "plot-shape_accuracy.png").exists() and (
        out / "plot-colour_accuracy.png"
    ).exists()
    assert "shape_accuracy" in result.stdout and "12 points run, 0 skipped" in result.stdout
    assert "unavailable: fid, kid: set --inception_weights=FILE" in result.stdout
    assert "unavailable: clip_score: set --clip_weights=DIR" in result.stdout

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".json", ".csv")}
    grids_before = {p: p.stat().st_mtime_ns for p in (out / "grids").iterdir()}
    contents = (out / "results.json").read_text()
    result = _run_on_8_devices(*sweep)
    assert result.returncode == 0, result.stderr
    assert "0 points run, 12 skipped" in result.stdout
    assert result.stderr.count("finished before, skipped") == 12
    assert (out / "results.json").read_text() == contents
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in grids_before} == grids_before

    # A bad value is one line naming the key, before any model is loaded.
    result = _run_on_8_devices("evaluate", f"--workdir={workdir}", "--sweep=steps=2 checkpoint=7")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--sweep checkpoint=7: no such checkpoint" in result.stderr
