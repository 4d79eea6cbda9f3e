"""The ``catsdogs`` command line: thin wrappers over plain functions that return results.

One module per command group (``data``, ``training``, ``registry``, ``serving``, ``monitoring``,
``deployment``); this one wires them into one app and turns expected failures into exit codes.
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

from catsdogs import CatsdogsError, __version__
from catsdogs.cli import batch, data, deployment, monitoring, quickstart, registry, serving, training
from catsdogs.cli.common import console
from catsdogs.settings import PARAMS_FILE_ENV

app = typer.Typer(
    name="catsdogs",
    help="Tell cats from dogs: data, training, registry, serving, monitoring and deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data.app, name="data")
app.add_typer(training.app)
app.add_typer(registry.app)
app.add_typer(registry.models_app, name="models")
app.add_typer(serving.app)
app.add_typer(monitoring.app)
app.add_typer(batch.app)
app.add_typer(deployment.app, name="deploy")
app.add_typer(quickstart.app)


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


def main() -> None:
    """Entry point: run the app; expected failures become one line on stderr and exit code 1."""
    try:
        # Without standalone mode click *returns* the code of `typer.Exit(n)` instead of raising it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CatsdogsError as exc:
        # soft_wrap: one line whatever the width (rich wraps at 80 columns when stderr is no terminal).
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]aborted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and validation errors
        import click
        from pydantic import ValidationError

        # Typer 0.29 raises its own copy of click's exceptions (typer.TyperException), not click's.
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        if isinstance(exc, ValidationError):
            console.print(f"[bold red]error:[/] invalid settings: {exc}", highlight=False)
            sys.exit(2)
        raise
