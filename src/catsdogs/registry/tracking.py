"""Experiment tracking: one MLflow run per training, ending in a registered ``challenger`` version."""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import re
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking._model_registry import utils as _registry_utils
from mlflow.tracking._tracking_service import utils as _tracking_utils

from catsdogs import CatsdogsError, __version__
from catsdogs.bundle import METADATA, find_bundle, write_json_atomic, write_manifest
from catsdogs.files import file_sha256
from catsdogs.registry.bundle_cache import MANIFEST_TAG
from catsdogs.registry.client import (
    BUNDLE_ARTIFACT,
    CHALLENGER,
    INPUT_COLUMN,
    TEST_SPLIT_TAG,
    move_alias,
)
from catsdogs.registry.lineage import dvc_data_version, git_commit, split_fingerprint
from catsdogs.registry.model_source import env_defaults, make_client, registry_uri
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
#: The pyfunc's code file ("models from code"); MLflow copies it into the logged model.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
#: What the logged pyfunc needs to run (serving side only: no torch), pinned to what is installed.
PYFUNC_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas", "pillow", "pydantic")
_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def pinned_requirements() -> list[str]:
    """``name==version`` for the pyfunc's runtime dependencies, plus this package."""
    pins = []
    for name in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            _logger.warning("%s is not installed; the logged model will not pin it", name)
    return [*pins, f"catsdogs=={__version__}"]


def flatten_metrics(metrics: dict[str, Any], prefix: str = "test") -> dict[str, float]:
    """Numeric leaves of a metrics dict as MLflow metric names: ``per_class.cat.recall`` becomes
    ``test_per_class_cat_recall``, ``accuracy_ci95: [lo, hi]`` becomes ``..._low``/``..._high``.
    Other lists (the confusion matrix) and strings are skipped; they go into ``test_metrics.json``."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = _METRIC_KEY.sub("_", f"{prefix}_{key}")
        if isinstance(value, numbers.Real):  # Python and NumPy numbers, bools too
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, list | tuple) and len(value) == 2 and key.endswith("ci95"):
            flat[f"{name}_low"], flat[f"{name}_high"] = float(value[0]), float(value[1])
    return flat


def _plain(value: Any) -> Any:
    """JSON fallback for NumPy scalars and arrays (evaluation code often returns them)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:6000]  # MLflow's parameter value limit
    return flat


@contextlib.contextmanager
def _global_uris(tracking_uri: str, registry: str) -> Iterator[None]:
    """Point MLflow's fluent API at our store for a while, then put back exactly what was there
    (``mlflow.pyfunc.log_model`` only works through the fluent API and its active run)."""
    from mlflow.environment_variables import MLFLOW_REGISTRY_URI, MLFLOW_TRACKING_URI

    saved_globals = (_tracking_utils._tracking_uri, _registry_utils._registry_uri)
    saved_env = [(variable, variable.get_raw()) for variable in (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI)]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry)
    try:
        yield
    finally:
        _tracking_utils._tracking_uri, _registry_utils._registry_uri = saved_globals
        for variable, value in saved_env:
            if value is None:
                variable.unset()
            else:
                variable.set(value)


def _signature(class_names: tuple[str, ...]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.double, "confidence")]
    outputs += [ColSpec(DataType.double, f"p_{name}") for name in class_names]
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]), outputs=Schema(outputs))


class MlflowTracker:
    """One MLflow run: parameters, per-epoch metrics, artifacts, then the model registered as challenger.

    Use as a context manager; the run ends FAILED if the block raises.
    """

    def __init__(self, settings: Settings, *, run_name: str | None = None) -> None:
        self.settings = settings
        self.run_name = run_name
        self.run_id = ""
        self._client = make_client(settings)
        self._uris: contextlib.AbstractContextManager[None] | None = None
        self._git_commit = "unknown"

    # --- lifecycle ---------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        name = self.settings.mlflow_experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(
                name, artifact_location=self.settings.mlflow_artifact_location
            )
        except MlflowException:  # created concurrently by another process
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def __enter__(self) -> MlflowTracker:
        self._uris = _global_uris(self.settings.mlflow_tracking_uri, registry_uri(self.settings))
        self._uris.__enter__()
        try:
            run = mlflow.start_run(experiment_id=self._experiment_id(), run_name=self.run_name)
        except BaseException:
            self._uris.__exit__(None, None, None)
            raise
        self.run_id = run.info.run_id
        self._git_commit = git_commit()
        mlflow.set_tags({"package_version": __version__, "git_commit": self._git_commit})
        _logger.info("MLflow run %s started in %s", self.run_id, self.settings.mlflow_tracking_uri)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")
        finally:
            if self._uris is not None:
                self._uris.__exit__(None, None, None)

    # --- logging during training -------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters; nested dicts become dotted names (``optimizer.lr``)."""
        mlflow.log_params(_flatten_params(params))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics with ``step=epoch`` (MLflow draws them as curves)."""
        mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=epoch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    # --- the end of training -----------------------------------------------------------------
    def _lineage_tags(self, manifest_path: Path | None) -> dict[str, str]:
        tags: dict[str, str] = {}
        if manifest_path is not None and manifest_path.is_file():
            manifest_sha = file_sha256(manifest_path)
            tags["manifest_sha256"] = manifest_sha
            dvc_md5 = dvc_data_version(self.settings.data_dir, manifest_path)
            tags["data_version"] = dvc_md5 or manifest_sha
            tags["data_version_source"] = "dvc" if dvc_md5 else "manifest_sha256"
            fingerprint = split_fingerprint(manifest_path)
            if fingerprint:
                tags[TEST_SPLIT_TAG] = fingerprint
        return tags

    def finish(
        self,
        *,
        bundle_dir: Path,
        test_metrics: dict[str, Any],
        artifacts_dir: Path,
        manifest_path: Path | None,
        report_path: Path | None,
    ) -> int:
        """Log the test results, evaluation artifacts, lineage and the bundle as a pyfunc model,
        register it as a new version of ``settings.model_name`` and give it the ``challenger`` alias.

        Returns:
            The new model version number.
        """
        if not self.run_id:
            raise CatsdogsError("MlflowTracker.finish() must be called inside `with MlflowTracker(...)`")
        bundle = find_bundle(bundle_dir)
        mlflow.log_metrics(flatten_metrics(test_metrics))
        mlflow.log_dict(json.loads(json.dumps(test_metrics, default=_plain)), "test_metrics.json")
        ood = bundle.metadata.get("ood")
        if ood:  # the unknown detector: its thresholds and validation rate next to the test rate
            mlflow.log_metrics(flatten_metrics(ood, "unknown"))
            mlflow.log_dict(ood, "unknown_detector.json")
        if artifacts_dir.is_dir():
            mlflow.log_artifacts(str(artifacts_dir))
        if report_path is not None and report_path.is_file():
            mlflow.log_artifact(str(report_path), artifact_path="data")
        tags = self._lineage_tags(manifest_path)
        if "manifest_sha256" in tags:
            mlflow.log_param("manifest_sha256", tags["manifest_sha256"])
        mlflow.set_tags(tags)

        metadata = {**bundle.metadata, "run_id": self.run_id}
        if "data_version" in tags:
            metadata.setdefault("data_version", tags["data_version"])
        write_json_atomic(bundle.root / METADATA, metadata)
        tags[MANIFEST_TAG] = write_manifest(bundle.root)  # after the last change to the bundle

        model_info = self._log_pyfunc(bundle.root, tuple(bundle.preprocessing.class_names))
        version = self._register(model_info, test_metrics, tags)
        mlflow.set_tag("registered_version", str(version))
        return version

    def _log_pyfunc(self, bundle_root: Path, class_names: tuple[str, ...]) -> Any:
        import mlflow.pyfunc

        quiet = env_defaults({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})  # no tqdm in training logs
        with tempfile.TemporaryDirectory(prefix="catsdogs-bundle-") as tmp, quiet:
            # MLflow names the artifact folder after the source folder; serving expects artifacts/bundle.
            source = bundle_root
            if bundle_root.name != BUNDLE_ARTIFACT:
                source = Path(tmp) / BUNDLE_ARTIFACT
                shutil.copytree(bundle_root, source)
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(PYFUNC_CODE),
                artifacts={BUNDLE_ARTIFACT: str(source)},
                signature=_signature(class_names),
                pip_requirements=pinned_requirements(),
            )

    def _register(self, model_info: Any, test_metrics: dict[str, Any], tags: dict[str, str]) -> int:
        name = self.settings.model_name
        try:
            self._client.create_registered_model(
                name, description="Cat-vs-dog image classifier (ONNX bundle as an MLflow pyfunc)."
            )
        except MlflowException as exc:
            if exc.error_code not in {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}:
                raise
        version_tags = {
            key: value
            for key, value in tags.items()
            if key in {TEST_SPLIT_TAG, "data_version", "manifest_sha256", MANIFEST_TAG}
        }
        version_tags["git_commit"] = self._git_commit
        version_tags["package_version"] = __version__
        if "accuracy" in test_metrics:
            version_tags["test_accuracy"] = f"{float(test_metrics['accuracy']):.6f}"
        model_version = self._client.create_model_version(
            name=name,
            source=model_info.model_uri,
            run_id=self.run_id,
            tags=version_tags,
            model_id=model_info.model_id,
        )
        version = int(model_version.version)
        move_alias(
            self._client, self.settings, CHALLENGER, version, reason=f"trained by MLflow run {self.run_id}"
        )
        _logger.info("registered %s version %d as %s", name, version, CHALLENGER)
        return version


def log_export(
    settings: Settings, run_id: str, *, int8_path: Path | None, int8: dict[str, Any] | None
) -> None:
    """Record a later ``catsdogs export`` on the training run that produced the bundle.

    The INT8 graph is logged under ``export/`` and its accuracies as ``int8_<split>_accuracy`` and
    ``int8_<split>_drop`` metrics, so the run shows what the exported variant is worth.
    """
    client = make_client(settings)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise CatsdogsError(
            f"the bundle's MLflow run {run_id} is not in {settings.mlflow_tracking_uri}: "
            "point CATSDOGS_MLFLOW_TRACKING_URI at the store it was trained with, or use --no-log"
        ) from exc
    if int8_path is not None:
        client.log_artifact(run_id, str(int8_path), artifact_path="export")
    for split in ("val", "test"):
        if int8 and split in int8:
            client.log_metric(run_id, f"int8_{split}_accuracy", float(int8[split]["int8_accuracy"]))
            client.log_metric(run_id, f"int8_{split}_drop", float(int8[split]["drop"]))
    if int8 is not None:
        client.set_tag(run_id, "export.int8", "accepted" if int8.get("accepted") else "refused")
