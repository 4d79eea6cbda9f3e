"""The ``catsdogs`` command line: thin wrappers over plain functions that return results.

Heavy modules (torch, MLflow, ONNX Runtime) are imported inside the commands that need them, so
``--help`` is instant and the serving install never touches training code.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from catsdogs import CatsdogsError, __version__
from catsdogs.settings import PARAMS_FILE_ENV, Settings, get_settings

app = typer.Typer(
    name="catsdogs",
    help="Tell cats from dogs: data, training, registry, serving, monitoring and deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Ingest, validate, de-duplicate and split datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"catsdogs {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    params: Annotated[
        Path | None, typer.Option("--params", help="Parameter file (default: ./params.yaml).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if params is not None:
        os.environ[PARAMS_FILE_ENV] = str(params)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings(**overrides: object) -> Settings:
    return get_settings(**overrides)


# --- data --------------------------------------------------------------------------------------


@data_app.command("fetch")
def data_fetch(
    source: Annotated[
        str | None,
        typer.Option("--source", help="Zip, folder or http(s) URL (default: settings data_source)."),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected SHA-256 (default: CATSDOGS_DATA_SHA256).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also put the archive here (the DVC fetch stage's output)."),
    ] = None,
    allow_unverified: Annotated[
        bool, typer.Option("--allow-unverified", help="Download a URL that has no known SHA-256.")
    ] = False,
) -> None:
    """Download the data source once into the cache (verified), or check a local one; print its path."""
    from catsdogs.data.download import is_url
    from catsdogs.data.fetch import fetch_archive, place

    settings = _settings(data_source=source, data_sha256=sha256)
    path = fetch_archive(settings, allow_unverified=allow_unverified)
    typer.echo(place(path, out, link=is_url(settings.data_source)) if out is not None else path)


@data_app.command("ingest")
def data_ingest(
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Zip, folder or http(s) URL (default: settings data_source / CATSDOGS_DATA_SOURCE).",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Output folder (default: data).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Split seed (default: params.yaml).")] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected SHA-256 of a downloaded archive.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoding processes (default: one per core).")
    ] = None,
) -> None:
    """Validate, de-duplicate and split a data set into data_dir (images/, manifest.csv, data_report.json)."""
    from rich.table import Table

    from catsdogs.data import ingest

    settings = _settings(
        data_source=source, data_dir=data_dir, seed=seed, data_sha256=sha256, ingest_workers=workers
    )
    result = ingest(settings)
    report = result.report
    table = Table(title=f"{report['counts']['manifest_rows']} images in {result.manifest_path}")
    table.add_column("class")
    for split in ("train", "val", "test", "total"):
        table.add_column(split, justify="right")
    for label, counts in report["per_class"].items():
        table.add_row(label, *(str(counts[s]) for s in ("train", "val", "test", "total")))
    console.print(table)
    counts = report["counts"]
    rejected = ", ".join(f"{k}={v}" for k, v in report["rejections_by_reason"].items()) or "none"
    console.print(
        f"{counts['files']} files, {counts['accepted']} valid, {counts['rejected']} rejected ({rejected}); "
        f"{counts['exact_duplicates_removed']} exact duplicates removed, "
        f"{counts['near_duplicate_groups']} near-duplicate groups, "
        f"{counts['conflicting_images_excluded']} images with conflicting labels excluded; "
        f"{counts['files'] / max(result.seconds, 1e-9):.0f} files/s. Report: {result.report_path}",
        highlight=False,
    )


# --- training, evaluation and registry ---------------------------------------------------------

models_app = typer.Typer(help="Inspect the registered model versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _champion_evaluator(settings: Settings) -> Callable[[Path], dict] | None:
    """Re-tests a bundle on the current test split (when the champion was tested on another one);
    None when the torch side (catsdogs.training.evaluate) is not installed."""
    try:
        from catsdogs.training.evaluate import evaluate_bundle
    except ImportError:
        return None
    from catsdogs.bundle import find_bundle

    def evaluate(bundle_dir: Path) -> dict:
        result = evaluate_bundle(
            find_bundle(bundle_dir), settings.manifest_path, split="test", progress=False
        )
        return result.metrics

    return evaluate


@app.command()
def promote(
    version: Annotated[
        int | None, typer.Option("--version", help="Version to promote (default: the challenger).")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded with the alias change.")] = "",
) -> None:
    """Move the `champion` alias to the challenger if it passes the quality gate (exit 1 if refused)."""
    from catsdogs.registry import promote as promote_version

    settings = _settings()
    decision = promote_version(
        settings, version=version, reason=reason, evaluate=_champion_evaluator(settings)
    )
    typer.echo(decision.table())
    typer.echo(decision.message)
    if not decision.accepted:
        raise typer.Exit(1)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded with the alias change.")] = "",
) -> None:
    """Move the `champion` alias back to the previous champion."""
    from catsdogs.registry import rollback as rollback_champion

    settings = _settings()
    version = rollback_champion(settings, reason=reason)
    typer.echo(f"{settings.model_name}: champion is now v{version}")


@models_app.command("list")
def models_list() -> None:
    """Every registered version with its aliases and test metrics."""
    from datetime import UTC, datetime

    from rich.table import Table

    from catsdogs.registry import list_versions

    settings = _settings()
    rows = list_versions(settings)
    labels = sorted({label for row in rows for label in row.recall})
    table = Table(title=f"{settings.model_name} ({settings.mlflow_tracking_uri})")
    for column in ("version", "aliases", "created (UTC)", "test accuracy", *[f"recall {x}" for x in labels]):
        table.add_column(column)
    table.add_column("test split")
    table.add_column("run")
    for row in rows:
        created = datetime.fromtimestamp(row.created_at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            str(row.version),
            ", ".join(row.aliases),
            created,
            "-" if row.accuracy is None else f"{row.accuracy:.4f}",
            *["-" if label not in row.recall else f"{row.recall[label]:.4f}" for label in labels],
            (row.test_split or "-")[:12],
            row.run_id or "-",
        )
    Console(width=200).print(table)


@app.command("train")
def train_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="efficientnet_lite0|1|2 (pretrained) or simple_cnn; several, comma-separated, "
            "train an ensemble of one model each.",
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="finetune (default: last blocks on cached activations) or head (frozen backbone)."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="default, or best (three models, 14 blocks fine-tuned on random augmentations; ~1 h). "
            "Flags given with it win over its settings."
        ),
    ] = None,
    finetune_blocks: Annotated[
        int | None, typer.Option(min=0, help="finetune: how many of the last backbone blocks to train.")
    ] = None,
    head: Annotated[str | None, typer.Option(help="Head on the features: linear or mlp.")] = None,
    members: Annotated[
        int | None,
        typer.Option(min=1, max=8, help="Train an ensemble of this many models (seeds seed, seed+1, ...)."),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(min=32, help="Input size (default: the backbone's; 280 for Lite2).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Most epochs (default: 1 for finetune, 30 for head).")
    ] = None,
    lr_schedule_epochs: Annotated[
        int | None,
        typer.Option(
            min=1, help="Epochs the LR schedule spans (default: --epochs); more stops before its tail."
        ),
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Minutes of training: no epoch is started that would end later (each run "
            "trains at least one per model; export and test come after).",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", min=0.0)] = None,
    max_train_images: Annotated[int | None, typer.Option(min=1, help="Cap on training images.")] = None,
    max_eval_images: Annotated[int | None, typer.Option(min=1, help="Cap on val and test images.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Folder under runs_dir for this run.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with manifest.csv.")] = None,
    runs_dir: Annotated[Path | None, typer.Option()] = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")
    ] = False,
    track: Annotated[
        bool, typer.Option("--track/--no-track", help="Log to MLflow and register the model.")
    ] = True,
) -> None:
    """Train a model, write its bundle (ONNX, test metrics, drift reference), log it to MLflow and
    register it as the new `challenger`."""
    from catsdogs.training.train import train

    archs = [name.strip() for name in model.split(",")] if model else []
    settings = _settings(
        architecture=archs[0] if archs else None,
        ensemble_architectures=archs if len(archs) > 1 else None,
        strategy=strategy, profile=profile, head=head, epochs=epochs,
        lr_schedule_epochs=lr_schedule_epochs, finetune_blocks=finetune_blocks, image_size=image_size,
        ensemble_members=members, time_budget_minutes=time_budget,
        batch_size=batch_size, learning_rate=learning_rate, max_train_images=max_train_images,
        max_eval_images=max_eval_images, run_name=run_name, data_dir=data_dir, runs_dir=runs_dir,
        cache_dir=cache_dir, device=device,
    )  # fmt: skip
    version = None
    if not track or int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 logs
        result = train(settings, tracker=None, resume=resume)
    else:
        from catsdogs.registry import MlflowTracker

        with MlflowTracker(settings, run_name=settings.run_name) as tracker:
            result = train(settings, tracker=tracker, resume=resume)
            version = tracker.finish(
                bundle_dir=result.bundle_dir,
                test_metrics=result.test_metrics,
                artifacts_dir=result.artifacts_dir,
                manifest_path=settings.manifest_path,
                report_path=settings.report_path,
            )
    if not result.test_metrics:  # a non-zero torchrun rank
        return
    low, high = result.test_metrics["accuracy_ci95"]
    typer.echo(
        f"bundle: {result.bundle_dir}\n"
        f"test accuracy: {result.test_metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
        f"n={result.test_metrics['n_images']})\n"
        f"epochs: {len(result.history)}, wall time: {result.elapsed_s:.0f} s"
    )
    if version is not None:
        typer.echo(f"registered {settings.model_name} v{version} as challenger; `catsdogs promote` next")


@app.command("evaluate")
def evaluate_command(
    model_uri: Annotated[str, typer.Option("--model-uri", help="Bundle folder (or models:/ URI).")],
    data: Annotated[Path, typer.Option("--data", help="Labelled folder, .zip archive or manifest.csv.")],
    split: Annotated[str | None, typer.Option(help="With a manifest: train, val or test.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Evaluate model.int8.onnx.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write metrics.json and predictions.csv here.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many images.")] = None,
) -> None:
    """Accuracy (95% Wilson CI), precision, recall, F1, log-loss, ROC-AUC and confusion matrix."""
    import json

    from catsdogs.training.evaluate import evaluate_bundle, resolve_model_uri

    settings = _settings()
    bundle = resolve_model_uri(model_uri, settings=settings)
    result = evaluate_bundle(bundle, data, split=split, tta=tta, int8=int8, out_dir=out, limit=limit)
    typer.echo(json.dumps(result.metrics, indent=2))
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} undecodable images", highlight=False)


# --- export and serving ------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    model_uri: Annotated[
        str | None, typer.Option("--model-uri", help="models:/name@alias or a bundle folder.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes.")] = None,
) -> None:
    """Serve the model over HTTP (FastAPI on ONNX Runtime) until SIGTERM."""
    from catsdogs.serve.server import serve

    serve(_settings(model_uri=model_uri, host=host, port=port, workers=workers))


@app.command("smoke")
def smoke_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of the running service.")],
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Folder of <label>.<anything>.jpg (default: the bundle's samples)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="CATSDOGS_SMOKE_API_KEY", help="API key, if required.")
    ] = None,
) -> None:
    """Check a running service end to end; exit code 1 on any failure."""
    from catsdogs.serve.smoke import run_smoke

    report = run_smoke(url, images_dir=images, api_key=api_key)
    for check in report.checks:
        mark = "[green]ok[/]" if check.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {check.name}: {check.detail}", highlight=False)
    if not report.ok:
        raise CatsdogsError(f"smoke test of {url} failed")


@app.command("export")
def export_command(
    model_uri: Annotated[str, typer.Option("--model-uri", help="Bundle folder (or models:/ URI).")],
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write a statically quantized model.int8.onnx.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Dataset for parity, INT8 calibration and accuracy checks.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the exported bundle here (a copy) instead of in place."),
    ] = None,
    log: Annotated[
        bool,
        typer.Option("--log/--no-log", help="Record the INT8 export on the bundle's MLflow training run."),
    ] = True,
) -> None:
    """Write the bundle's model.onnx (dynamic batch), checked against PyTorch on real images."""
    import json

    from catsdogs.training.evaluate import resolve_model_uri
    from catsdogs.training.export import export_bundle

    settings = _settings(data_dir=data_dir)
    bundle = resolve_model_uri(model_uri, settings=settings)
    report = export_bundle(bundle, settings=settings, int8=int8, out=out)
    run_id = bundle.metadata.get("run_id")
    if log and int8 and run_id:
        from catsdogs.registry.tracking import log_export

        log_export(settings, run_id, int8_path=report.int8_path, int8=report.int8)
    typer.echo(
        json.dumps(
            {"onnx": str(report.onnx_path), "parity": report.parity.to_dict(), "int8": report.int8}, indent=2
        )
    )


# --- monitoring --------------------------------------------------------------------------------


@app.command("evaluate-deployed")
def evaluate_deployed_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of the running service.")],
    data: Annotated[
        Path,
        typer.Option("--data", help="Labelled images: a folder with cat/ and dog/, or a Kaggle-layout zip."),
    ],
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Send at most this many images (classes balanced).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="CATSDOGS_EVAL_API_KEY", help="API key, if required.")
    ] = None,
    feedback: Annotated[
        bool, typer.Option("--feedback/--no-feedback", help="Send the true labels to /feedback.")
    ] = True,
) -> None:
    """Evaluate a running service on labelled images; log the result to MLflow; print it as JSON."""
    import json

    from catsdogs.monitoring.evaluate_deployed import evaluate_deployed, log_to_mlflow

    settings = _settings()
    result = evaluate_deployed(
        url, data, classes=settings.classes, limit=limit, api_key=api_key, send_feedback=feedback
    )
    log_to_mlflow(result, settings, data_source=str(data))
    typer.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))


# --- deployment --------------------------------------------------------------------------------

deploy_app = typer.Typer(
    help="Ship the API to Kubernetes: apply an overlay, wait, smoke-test, roll back on failure.",
    invoke_without_command=True,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.callback()
def deploy_command(
    ctx: typer.Context,
    overlay: Annotated[
        Path | None, typer.Option("--overlay", help="Kustomize overlay, e.g. deploy/k8s/overlays/production.")
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Serving image, name:tag or name@sha256:digest.")
    ] = None,
    smoke_url: Annotated[
        str | None,
        typer.Option("--smoke-url", help="Base URL of the deployed API; `catsdogs smoke` runs against it."),
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Kubernetes namespace.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Rollout timeout in seconds.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print the rendered manifests; apply nothing.")
    ] = False,
) -> None:
    """Apply OVERLAY with IMAGE, wait for the rollout, smoke-test; undo the rollout if either fails."""
    if ctx.invoked_subcommand is not None:
        return
    from catsdogs import deploy

    if overlay is None or image is None:
        raise CatsdogsError("catsdogs deploy needs --overlay and --image (or a subcommand: rollback)")
    settings = _settings(deploy_namespace=namespace, deploy_timeout_s=timeout)
    kubectl = deploy.Kubectl(settings.kubectl, context=settings.kube_context)
    if dry_run:
        typer.echo(deploy.render(overlay, image, kubectl=kubectl), nl=False)
        return
    result = deploy.deploy_and_verify(
        overlay,
        image,
        smoke_url=smoke_url,
        namespace=settings.deploy_namespace,
        deployment=settings.deploy_deployment,
        timeout_s=settings.deploy_timeout_s,
        kubectl=kubectl,
    )
    if not result.ok:
        raise CatsdogsError(f"{result.error}; deployment/{result.deployment} was rolled back")
    smoke = "smoke test passed" if result.smoke_passed else "no smoke URL given"
    console.print(f"deployed {image} to {result.namespace}/{result.deployment} ({smoke})")


@deploy_app.command("rollback")
def deploy_rollback_command(
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Kubernetes namespace.")] = None,
    to_revision: Annotated[
        int | None, typer.Option("--to-revision", help="Revision to return to (default: the previous one).")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Rollout timeout in seconds.")] = None,
) -> None:
    """Undo the API Deployment's last rollout (not the registry alias: that is `catsdogs rollback`)."""
    from catsdogs import deploy

    settings = _settings(deploy_namespace=namespace, deploy_timeout_s=timeout)
    deploy.rollback(
        namespace=settings.deploy_namespace,
        deployment=settings.deploy_deployment,
        to_revision=to_revision,
        timeout_s=settings.deploy_timeout_s,
        kubectl=deploy.Kubectl(settings.kubectl, context=settings.kube_context),
    )
    console.print(f"rolled back {settings.deploy_namespace}/{settings.deploy_deployment}")


def main() -> None:
    """Entry point: run the app; expected failures become one line on stderr and exit code 1."""
    try:
        # Without standalone mode click *returns* the code of `typer.Exit(n)` instead of raising it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CatsdogsError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]aborted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and validation errors
        import click
        from pydantic import ValidationError

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, ValidationError):
            console.print(f"[bold red]error:[/] invalid settings: {exc}", highlight=False)
            sys.exit(2)
        raise
