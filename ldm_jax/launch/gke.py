"""``ldm-jax launch gke``: TPU slices on GKE as a JobSet (``kubectl apply``), or through XPK.

One Job per slice, one pod per TPU VM of the slice, every pod running the ldm-jax command
from ``--image``; the runtime joins the pods by itself (GKE gives each pod its peers in
``TPU_WORKER_HOSTNAMES``; several slices also get the MEGASCALE variables XPK sets).
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Sequence
from typing import Any

import yaml

from ldm_jax.launch.external import File, Step, step

NAME = "gke"
HELP = "TPU slices on GKE: a JobSet manifest for kubectl, or the equivalent xpk command."

# TPU type prefix (as gcloud and XPK name slices) -> GKE's accelerator node label.
_GKE_ACCELERATORS = {
    "v4": "tpu-v4-podslice",
    "v5litepod": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="JobSet (XPK: workload) name.")
    parser.add_argument("--image", required=True, help="Container image with ldm-jax installed.")
    parser.add_argument(
        "--tpu_type", required=True, help="Slice type, e.g. v5litepod-16 (as XPK names it)."
    )
    parser.add_argument("--topology", required=True, help="Chip topology, e.g. 4x4 or 2x2x2.")
    parser.add_argument("--num_slices", type=int, default=1, help="Slices (multislice over DCN).")
    parser.add_argument("--chips_per_vm", type=int, default=4, help="TPU chips per VM (pod).")
    parser.add_argument("--manifest", default=None, help="Where to write the JobSet YAML.")
    parser.add_argument("--xpk", action="store_true", help="Run xpk instead of kubectl.")
    parser.add_argument("--cluster", default=None, help="XPK: the GKE cluster.")
    parser.add_argument("--project", default=None, help="XPK: the Google Cloud project.")
    parser.add_argument("--zone", default=None, help="XPK: the cluster's zone.")


def _accelerator(tpu_type: str) -> str:
    generation = tpu_type.rsplit("-", 1)[0]
    if generation not in _GKE_ACCELERATORS:
        raise ValueError(
            f"--tpu_type={tpu_type!r}: unknown TPU generation {generation!r}; "
            f"known: {sorted(_GKE_ACCELERATORS)}"
        )
    return _GKE_ACCELERATORS[generation]


def _vms_per_slice(topology: str, chips_per_vm: int) -> int:
    try:
        chips = math.prod(int(d) for d in topology.split("x"))
    except ValueError:
        raise ValueError(f"--topology={topology!r} must look like 4x4 or 2x2x2") from None
    if chips % chips_per_vm:
        raise ValueError(
            f"--topology={topology} has {chips} chips, not a multiple of --chips_per_vm="
            f"{chips_per_vm}"
        )
    return max(chips // chips_per_vm, 1)


def jobset(args: argparse.Namespace, command: Sequence[str]) -> dict[str, Any]:
    """The JobSet manifest, as a dict."""
    vms = _vms_per_slice(args.topology, args.chips_per_vm)
    env = []
    if args.num_slices > 1:
        env = [
            {
                "name": "MEGASCALE_COORDINATOR_ADDRESS",
                "value": f"{args.name}-slice-0-0.{args.name}",
            },
            {"name": "MEGASCALE_NUM_SLICES", "value": str(args.num_slices)},
            {
                "name": "MEGASCALE_SLICE_ID",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"
                    }
                },
            },
        ]
    container = {
        "name": "ldm-jax",
        "image": args.image,
        "command": ["ldm-jax", *command],
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": args.chips_per_vm}},
        **({"env": env} if env else {}),
    }
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": _accelerator(args.tpu_type),
            "cloud.google.com/gke-tpu-topology": args.topology,
        },
        "containers": [container],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": args.name,
            # One slice per node pool, never two slices sharing one.
            "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [
                {
                    "name": "slice",
                    "replicas": args.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": vms,
                            "completions": vms,
                            "backoffLimit": 0,
                            "template": {"spec": pod},
                        }
                    },
                }
            ],
        },
    }


class _ManifestDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with every string value double-quoted, keys left plain.

    PyYAML quotes only the strings that PyYAML would read back as something else, but
    kubectl reads YAML with go-yaml v2, which also takes ``y``/``n`` for booleans and
    ``1e-4`` or ``0o17`` for numbers: a ``command`` such as ``train --lr 1e-4`` would
    reach the API server with a number in it and be rejected. A double-quoted scalar is a
    string to every YAML reader.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')


def _represent_dict(dumper: yaml.SafeDumper, mapping: dict) -> yaml.MappingNode:
    node = dumper.represent_dict(mapping)
    # Keys are Kubernetes field names and label keys from `jobset`, never user input: plain,
    # as manifests are written (PyYAML still quotes a key that needs it).
    for key, _ in node.value:
        key.style = None
    return node


_ManifestDumper.add_representer(str, _represent_str)
_ManifestDumper.add_representer(dict, _represent_dict)


def to_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as one YAML document, keys in the order they were built.

    Args:
      manifest: Dicts, lists, strings, ints and bools (as ``jobset`` builds them).

    Returns:
      The YAML text; ``yaml.safe_load`` (and kubectl) read it back as ``manifest``.
    """
    # No line width: each value stays on one line, so the printed manifest reads like the
    # command it runs.
    return yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=math.inf)


def plan(args: argparse.Namespace, command: Sequence[str]) -> tuple[list[File], list[Step]]:
    if args.num_slices < 1:
        raise ValueError(f"--num_slices={args.num_slices} must be at least 1")
    if args.xpk:
        missing = [f"--{k}" for k in ("cluster", "project", "zone") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"--xpk needs {', '.join(missing)}")
        _accelerator(args.tpu_type)
        xpk = [
            "xpk",
            "workload",
            "create",
            f"--cluster={args.cluster}",
            f"--project={args.project}",
            f"--zone={args.zone}",
            f"--workload={args.name}",
            f"--docker-image={args.image}",
            f"--tpu-type={args.tpu_type}",
            f"--num-slices={args.num_slices}",
            f"--command=ldm-jax {shlex.join(command)}",
        ]
        return [], [step(f"create XPK workload {args.name}", xpk)]
    manifest = args.manifest or f"{args.name}-jobset.yaml"
    files = [File(manifest, to_yaml(jobset(args, command)))]
    return files, [step(f"submit JobSet {args.name}", ["kubectl", "apply", "-f", manifest])]
