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
