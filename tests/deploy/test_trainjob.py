"""The multi-node training manifest: a Kubeflow Trainer ``TrainJob`` rendered by kustomize, checked
against the TrainJob schema of the ``kubeflow-trainer-api`` package (strictly: an unknown field
fails, as ``kubectl --validate=strict`` would refuse it), and the pods it makes held to the same
hardening and checkov rules as every other workload of the stack."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

from support import require_module

from .conftest import OVERLAYS, find, kustomize, local_tool, require_tool

pytestmark = pytest.mark.integration

OVERLAY = OVERLAYS / "distributed-training"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return kustomize(OVERLAY)


@pytest.fixture(scope="module")
def trainjob(docs: list[dict]) -> dict:
    return find(docs, "TrainJob", "catsdogs-train-distributed")


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused in every object that lists its properties."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def unwrap_one_of(schema: dict) -> dict:
    """OpenAPI Generator models a ``oneOf`` type (Quantity: a string or a number) as a wrapper class
    whose ``actual_instance`` holds the value; on the wire it is the value itself."""
    for name, definition in schema.get("$defs", {}).items():
        wrapped = definition.get("properties", {}).get("actual_instance")
        if wrapped and "one_of_schemas" in definition["properties"]:
            choices = [c for c in wrapped["anyOf"] if c.get("type") != "null"]
            schema["$defs"][name] = {"anyOf": choices, "description": definition.get("description", "")}
    return schema


@pytest.fixture(scope="module")
def trainjob_schema() -> dict:
    """TrainJob's OpenAPI schema as the Kubeflow Trainer project publishes it on PyPI (its API models)."""
    models = require_module("kubeflow_trainer_api.models", extra="dev")
    return strict(unwrap_one_of(models.TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)))


def _errors(schema: dict, doc: dict) -> list[str]:
    """Every error, those inside ``anyOf`` branches (optional fields) included, as ``path: message``."""
    import jsonschema

    def flatten(errors: Iterable[jsonschema.ValidationError]) -> Iterator[str]:
        for error in errors:
            yield f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
            yield from flatten(error.context or [])

    return list(flatten(jsonschema.Draft202012Validator(schema).iter_errors(doc)))


def test_the_trainjob_validates_against_the_published_schema(trainjob: dict, trainjob_schema: dict) -> None:
    assert trainjob["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert _errors(trainjob_schema, trainjob) == []


@pytest.mark.parametrize(
    "where",
    [
        ("spec",),
        ("spec", "trainer"),
        ("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec"),
    ],
)
def test_a_misspelled_field_fails_validation(trainjob: dict, trainjob_schema: dict, where: tuple) -> None:
    broken = copy.deepcopy(trainjob)
    node = broken
    for key in where:
        node = node[key]
    misspelt = {"spec": "numNode", "trainer": "resourcePerNode"}.get(str(where[-1]), "replicatedJob")
    node[misspelt] = 2
    assert any(f"'{misspelt}' was unexpected" in error for error in _errors(trainjob_schema, broken))


def test_a_wrongly_typed_value_fails_validation(trainjob: dict, trainjob_schema: dict) -> None:
    broken = copy.deepcopy(trainjob)
    broken["spec"]["trainer"]["numNodes"] = "two"
    assert _errors(trainjob_schema, broken)


def test_torchrun_runs_catsdogs_train_on_several_nodes_with_the_stacks_settings(trainjob: dict) -> None:
    trainer = trainjob["spec"]["trainer"]
    assert trainer["command"][:1] == ["torchrun"] and trainer["command"][-2:] == ["catsdogs", "train"]
    assert trainer["numNodes"] >= 2 and trainer["image"].startswith("ghcr.io/catsdogs/catsdogs-train:")
    assert trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainjob["spec"]["suspend"] is True, "applying the overlay must not start a run"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["CATSDOGS_MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "catsdogs-config"
    assert {"requests", "limits"} <= set(trainer["resourcesPerNode"])


def node_job(trainjob: dict) -> dict:
    """The Job the runtime makes for the nodes (one of the JobSet's): the runtime patch's pod
    template with the trainer's container settings (image, command, env, resources) merged into
    the ``node`` container."""
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    (job,) = [j for j in patch["replicatedJobs"] if j["name"] == "node"]
    template = copy.deepcopy(job["template"]["spec"]["template"])
    trainer = trainjob["spec"]["trainer"]
    (container,) = template["spec"]["containers"]
    container.update(
        image=trainer["image"],
        command=trainer["command"],
        env=trainer["env"],
        resources=trainer["resourcesPerNode"],
    )
    template["spec"]["automountServiceAccountToken"] = False  # the service account's own setting (base)
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "catsdogs-train-distributed-node", "namespace": "catsdogs"},
        "spec": {"template": template},
    }


def test_the_node_pods_are_non_root_read_only_without_capabilities(trainjob: dict) -> None:
    pod = node_job(trainjob)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = pod["containers"][0]["securityContext"]
    assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
    assert context["capabilities"]["drop"] == ["ALL"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"] == {"claimName": "catsdogs-data", "readOnly": True}


def test_the_node_jobs_and_the_network_policy_validate_strictly(
    docs: list[dict], trainjob: dict, tmp_path: Path
) -> None:
    validate = require_tool("kubernetes-validate")
    builtin = [d for d in docs if d["kind"] != "TrainJob"] + [node_job(trainjob)]
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    done = subprocess.run([validate, "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_checkov_finds_no_failed_check_on_the_node_jobs(tmp_path: Path) -> None:
    """With the image pinned by digest, as the pipeline pins every overlay it deploys."""
    checkov = local_tool("checkov")
    shutil.copytree(OVERLAY, tmp_path / "overlay")
    kustomization = tmp_path / "overlay" / "kustomization.yaml"
    pinned = yaml.safe_load(kustomization.read_text())
    image = "ghcr.io/catsdogs/catsdogs-train"
    pinned["images"] = [{"name": image, "digest": f"sha256:{hashlib.sha256(image.encode()).hexdigest()}"}]
    kustomization.write_text(yaml.safe_dump(pinned))
    docs = kustomize(tmp_path / "overlay")
    job = node_job(find(docs, "TrainJob", "catsdogs-train-distributed"))
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([job, *(d for d in docs if d["kind"] != "TrainJob")]))
    done = subprocess.run(
        [checkov, "--skip-download", "--framework", "kubernetes", "-o", "json", "-f", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(done.stdout)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 20
