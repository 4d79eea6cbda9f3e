"""The ``catsdogs`` command line: thin wrappers over plain functions that return results.

Heavy modules (torch, MLflow, ONNX Runtime) are imported inside the commands that need them, so
``--help`` is instant and the serving install never touches training code.
"""

from __future__ import annotations

import logging
import os
import sys
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


# --- training, evaluation and registry ---------------------------------------------------------


@app.command("train")
def train_command(
    model: Annotated[
        str | None, typer.Option("--model", help="efficientnet_lite0|1|2 (pretrained) or simple_cnn.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="head (frozen backbone, cached features).")] = None,
    profile: Annotated[str | None, typer.Option(help="default or best.")] = None,
    head: Annotated[str | None, typer.Option(help="Head on the features: linear or mlp.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
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
) -> None:
    """Train a model on the ingested dataset and write its bundle (with ONNX and test metrics)."""
    from catsdogs.train import train

    settings = _settings(
        architecture=model, strategy=strategy, profile=profile, head=head, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, max_train_images=max_train_images,
        max_eval_images=max_eval_images, run_name=run_name, data_dir=data_dir, runs_dir=runs_dir,
        cache_dir=cache_dir, device=device,
    )  # fmt: skip
    result = train(settings, tracker=None, resume=resume)
    if not result.test_metrics:  # a non-zero torchrun rank
        return
    low, high = result.test_metrics["accuracy_ci95"]
    typer.echo(
        f"bundle: {result.bundle_dir}\n"
        f"test accuracy: {result.test_metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
        f"n={result.test_metrics['n_images']})\n"
        f"epochs: {len(result.history)}, wall time: {result.elapsed_s:.0f} s"
    )


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

    from catsdogs.evaluate import evaluate_bundle, resolve_model_uri

    settings = _settings()
    bundle = resolve_model_uri(model_uri, cache_dir=settings.cache_dir)
    result = evaluate_bundle(bundle, data, split=split, tta=tta, int8=int8, out_dir=out, limit=limit)
    typer.echo(json.dumps(result.metrics, indent=2))
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} undecodable images", highlight=False)


# --- export and serving ------------------------------------------------------------------------


@app.command("export")
def export_command(
    model_uri: Annotated[str, typer.Option("--model-uri", help="Bundle folder (or models:/ URI).")],
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write a statically quantized model.int8.onnx.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Dataset for parity, INT8 calibration and accuracy checks.")
    ] = None,
) -> None:
    """Write the bundle's model.onnx (dynamic batch), checked against PyTorch on real images."""
    import json

    from catsdogs.evaluate import resolve_model_uri
    from catsdogs.export import export_bundle

    settings = _settings(data_dir=data_dir)
    bundle = resolve_model_uri(model_uri, cache_dir=settings.cache_dir)
    report = export_bundle(bundle, settings=settings, int8=int8)
    typer.echo(
        json.dumps(
            {"onnx": str(report.onnx_path), "parity": report.parity.to_dict(), "int8": report.int8}, indent=2
        )
    )


# --- monitoring --------------------------------------------------------------------------------


# --- deployment --------------------------------------------------------------------------------


def main() -> None:
    """Entry point: run the app; expected failures become one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
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
