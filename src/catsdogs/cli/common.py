"""What every command module shares: the stderr console and the option types used by several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

ModelUriOption = Annotated[str, typer.Option("--model-uri", help="Bundle folder (or models:/ URI).")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; recorded with the alias change.")]
NamespaceOption = Annotated[str | None, typer.Option("--namespace", "-n", help="Kubernetes namespace.")]
TimeoutOption = Annotated[float | None, typer.Option("--timeout", help="Rollout timeout in seconds.")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Folder with manifest.csv.")]
