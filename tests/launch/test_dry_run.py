"""`ldm-jax launch tpu|gke|slurm --dry-run`: exactly the commands and manifests they would run."""

import argparse
import json
import os
import shlex
import shutil
import subprocess

import pytest
import yaml

from ldm_jax.launch import external, gke
from ldm_jax.launch.main import main

COMMAND = ["--", "train", "--config=configs/sd15.py", "--workdir=gs://bucket/run one"]

# Arguments that unquoted YAML reads as booleans, numbers, nulls, comments, mappings, aliases
# or tags; kubectl's reader (go-yaml v2) also takes y, n, 1e-4 and 0o17 for non-strings.
TRICKY = [
    "train", "true", "y", "n", "off", "1", "1e-4", "0o17", "0x1F", ".nan", "null", "~", "",
    "key: value", "# comment", "- item", "[list]", "{map: 1}", "&anchor", "*alias", "!tag",
    "'single'", '"double"', "two\nlines", " padded ", "é", "--workdir=gs://bucket/run one",
]  # fmt: skip


def _dry_run(capsys, *argv, command=COMMAND):
    assert main([*argv, "--dry-run", *command]) == 0
    return capsys.readouterr().out


def _commands(text):
    return [shlex.split(line.rstrip(" &")) for line in text.splitlines() if line[:1] not in "#w"]


TPU = [
    "tpu",
    "--name=ldm",
    "--project=proj",
    "--zone=us-west4-a",
    "--accelerator_type=v5litepod-16",
]
WHERE = ["--project=proj", "--zone=us-west4-a"]


def test_tpu_vm(capsys):
    commands = _commands(_dry_run(capsys, *TPU))
    create, scp, install, run, mkdir, collect, delete = commands
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "ldm", *WHERE,
        "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip
    assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "."]
    assert scp[7] == "ldm:ldm_jax" and scp[-1] == "--worker=all"
    assert install[4:6] == ["ssh", "ldm"] and "--worker=all" in install
    line = run[run.index("--command") + 1]
    assert "ldm-jax train --config=configs/sd15.py 'gs://bucket/run one'" not in line
    assert "ldm-jax train --config=configs/sd15.py '--workdir=gs://bucket/run one'" in line
    assert "set -o pipefail" in line and '| tee logs/ldm-jax-"$(hostname)".log' in line
    assert mkdir == ["mkdir", "-p", "launch_logs/ldm"]
    assert collect[6:8] == ["ldm:ldm_jax/logs", "launch_logs/ldm/ldm"]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ldm", *WHERE, "--quiet"]


def test_tpu_multislice_uses_queued_resources(capsys):
    text = _dry_run(capsys, *TPU, "--num_slices=2", "--keep")
    commands = _commands(text)
    assert commands[0] == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "ldm", *WHERE,
        "--accelerator-type=v5litepod-16", "--runtime-version=tpu-ubuntu2204-base",
        "--node-count=2", "--node-prefix=ldm",
    ]  # fmt: skip
    assert commands[1][4:6] == ["describe", "ldm"] and "(repeated until it prints ACTIVE)" in text
    runs = [c for c in commands if "--command" in c and "ldm-jax" in c[c.index("--command") + 1]]
    assert [c[5] for c in runs] == ["ldm-0", "ldm-1"]  # both slices at once
    assert not any("delete" in c for c in commands)  # --keep


GKE = ["--name=ldm", "--image=gcr.io/p/ldm:1", "--tpu_type=v5litepod-16", "--topology=4x4"]


def _manifest(capsys, *extra, command=COMMAND):
    text = _dry_run(capsys, "gke", *GKE, *extra, command=command)
    body = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   "))
    return yaml.safe_load(body), _commands(text)


def _jobset_yaml(command, *extra):
    """The planned JobSet dict and the manifest file's text, for ``GKE`` and ``extra``."""
    parser = argparse.ArgumentParser()
    gke.add_arguments(parser)
    args = parser.parse_args([*GKE, *extra])
    (manifest,), _ = gke.plan(args, command)
    return gke.jobset(args, command), manifest.content


def test_gke_jobset(capsys):
    manifest, commands = _manifest(capsys, "--num_slices=2")
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    replicated = manifest["spec"]["replicatedJobs"][0]
    assert replicated["replicas"] == 2
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4  # 16 chips, 4 per VM
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    container = pod["containers"][0]
    assert container["command"] == ["ldm-jax", *COMMAND[1:]]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert {e["name"] for e in container["env"]} >= {"MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID"}
    assert commands == [["kubectl", "apply", "-f", "ldm-jobset.yaml"]]


def test_gke_dry_run_prints_the_planned_jobset(capsys):
    printed, _ = _manifest(capsys, "--num_slices=2", command=["--", *TRICKY])
    planned, text = _jobset_yaml(TRICKY, "--num_slices=2")
    assert printed == yaml.safe_load(text) == planned
    job = printed["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["template"]["spec"]["containers"][0]["command"] == ["ldm-jax", *TRICKY]


def _string_values(node):
    if isinstance(node, yaml.MappingNode):
        return [s for _, value in node.value for s in _string_values(value)]
    if isinstance(node, yaml.SequenceNode):
        return [s for item in node.value for s in _string_values(item)]
    return [node] if node.tag == "tag:yaml.org,2002:str" else []


def test_gke_manifest_double_quotes_every_string_value():
    # PyYAML's round trip cannot catch what only kubectl's reader misreads (y, 1e-4);
    # a double-quoted scalar is a string to every reader.
    _, text = _jobset_yaml(TRICKY, "--num_slices=2")
    values = _string_values(yaml.compose(text))
    assert len(values) > len(TRICKY)
    assert {node.style for node in values} == {'"'}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl on the PATH")
def test_gke_manifest_as_kubectl_reads_it(tmp_path):
    planned, text = _jobset_yaml(TRICKY, "--num_slices=2")
    (tmp_path / "jobset.yaml").write_text(text, encoding="utf-8")
    # `label --local` parses the file as `kubectl apply` does, with no cluster.
    result = subprocess.run(
        ["kubectl", "label", "--local", "-f", str(tmp_path / "jobset.yaml"), "x=y", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    read = json.loads(result.stdout)
    del read["metadata"]["labels"]
    assert read == planned


def test_gke_xpk(capsys):
    text = _dry_run(
        capsys, "gke", *GKE, "--xpk", "--cluster=c", "--project=proj", "--zone=us-west4-a"
    )
    (xpk,) = _commands(text)
    assert xpk[:3] == ["xpk", "workload", "create"]
    assert "--tpu-type=v5litepod-16" in xpk and "--num-slices=1" in xpk
    assert (
        xpk[-1]
        == "--command=ldm-jax train --config=configs/sd15.py '--workdir=gs://bucket/run one'"
    )


def test_slurm_script(capsys):
    text = _dry_run(capsys, "slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                    "--time=04:00:00")  # fmt: skip
    script = [line[4:] for line in text.splitlines() if line.startswith("#   ")]
    assert script[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu"):
        assert f"#SBATCH {directive}" in script
    assert not any("gpus-per-task" in line for line in script)
    assert script[-1] == (
        "srun --kill-on-bad-exit=1 ldm-jax train --config=configs/sd15.py "
        "'--workdir=gs://bucket/run one'"
    )
    assert _commands(text) == [["sbatch", "ldm-jax.sbatch"]]


def test_missing_tool_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["slurm", "--nodes=1", "--gpus_per_node=1", f"--script={tmp_path / 's'}",
                 *COMMAND]) == 2  # fmt: skip
    assert "sbatch not found on the PATH" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gcloud not found"):
        external.check_tools([external.step("x", ["gcloud", "version"])])


def test_command_must_follow_double_dash(capsys):
    assert main(["slurm", "--nodes=1", "--gpus_per_node=1", "train"]) == 2
    assert "after `--`" in capsys.readouterr().err
