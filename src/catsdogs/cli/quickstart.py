"""``catsdogs quickstart`` (``make demo``): from nothing to a served model in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from catsdogs.cli.common import console

app = typer.Typer()


@app.command("quickstart")
def quickstart_command(
    folder: Annotated[
        Path, typer.Option("--dir", help="Folder for the demo's data, runs, caches and MLflow store.")
    ] = Path("demo"),
    per_class: Annotated[
        int | None, typer.Option("--per-class", min=20, help="Photos per class (default: 300, ~2 min).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="TCP port on 127.0.0.1 (default: the port setting).")
    ] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the model when done.")] = True,
    allow_unverified: Annotated[
        bool, typer.Option("--allow-unverified", help="Fetch the data even without a known SHA-256.")
    ] = False,
) -> None:
    """Fetch the data, ingest a small sample, train the fast `head` model, promote it and serve the
    upload page on 127.0.0.1 until Ctrl-C (`make demo`)."""
    from catsdogs.quickstart import DEFAULT_PER_CLASS, demo_settings, quickstart, serve_demo

    settings = demo_settings(folder, port=port)
    result = quickstart(
        settings,
        per_class=per_class or DEFAULT_PER_CLASS,
        allow_unverified=allow_unverified,
        say=lambda line: console.print(f"[bold]quickstart:[/] {line}", highlight=False, soft_wrap=True),
    )
    typer.echo(result.summary())
    if serve:
        serve_demo(settings, on_ready=lambda url: typer.echo(f"upload page: {url}  (Ctrl-C stops)"))
