"""``catsdogs predict-batch``: score a folder tree or zip archive of images into a CSV or JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from catsdogs.settings import get_settings

app = typer.Typer()


@app.command("predict-batch")
def predict_batch_command(
    source: Annotated[Path, typer.Argument(help="Folder tree or zip archive of images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result file: .csv or .jsonl.")],
    model_uri: Annotated[
        str | None, typer.Option("--model-uri", help="Bundle folder or models:/ URI (default: settings).")
    ] = None,
    engine: Annotated[str, typer.Option("--engine", help="local (threads + ORT) or ray (Ray Data).")] = (
        "local"
    ),
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv or jsonl (default: by the output's suffix).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per ORT call.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Decode threads (local) or actors (ray).")
    ] = None,
) -> None:
    """Score every image; unreadable files get a row with an error. Prints a summary as JSON."""
    from catsdogs.batch.predict import predict_batch

    overrides = {"predict_batch_size": batch_size, "predict_workers": workers}
    settings = get_settings(**{k: v for k, v in overrides.items() if v is not None})
    result = predict_batch(
        source,
        output,
        settings=settings,
        model_uri=model_uri,
        engine=engine,
        output_format=output_format,  # type: ignore[arg-type]
    )
    typer.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
