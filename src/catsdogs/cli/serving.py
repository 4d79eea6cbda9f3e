"""``catsdogs serve`` and ``smoke``: the HTTP service and its end-to-end check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from catsdogs import CatsdogsError
from catsdogs.cli.common import console
from catsdogs.settings import get_settings

app = typer.Typer()


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

    serve(get_settings(model_uri=model_uri, host=host, port=port, workers=workers))


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
