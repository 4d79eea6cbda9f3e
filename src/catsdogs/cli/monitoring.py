"""``catsdogs evaluate-deployed``: a running service measured on labelled photos; ``catsdogs guard``:
the automatic rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from catsdogs.settings import get_settings

app = typer.Typer()


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
    from catsdogs.monitoring.evaluate_deployed import evaluate_deployed, log_to_mlflow

    settings = get_settings()
    result = evaluate_deployed(
        url, data, classes=settings.classes, limit=limit, api_key=api_key, send_feedback=feedback
    )
    log_to_mlflow(result, settings, data_source=str(data))
    typer.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))


@app.command("guard")
def guard_command(
    once: Annotated[
        bool, typer.Option("--once", help="Check once, print the decision as JSON and exit (a CronJob).")
    ] = False,
    host: Annotated[str, typer.Option("--host", help="Interface the webhook binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port of the webhook and /metrics.")] = 9105,
) -> None:
    """Roll champion back when its live accuracy drops or an error alert fires (docs/monitoring.md)."""
    from catsdogs.monitoring.guard_app import run_once, serve_guard

    settings = get_settings()
    if once:
        typer.echo(json.dumps(run_once(settings).as_dict(), indent=2, sort_keys=True))
        return
    serve_guard(settings, host=host, port=port)
