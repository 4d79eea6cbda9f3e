"""``catsdogs promote``, ``rollback`` and ``models list``: the model registry's aliases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from catsdogs.cli.common import ReasonOption
from catsdogs.settings import Settings, get_settings

app = typer.Typer()
models_app = typer.Typer(help="Inspect the registered model versions.", no_args_is_help=True)


def _champion_evaluator(settings: Settings) -> Callable[[Path], dict] | None:
    """Re-tests a bundle on the current test split (when the champion was tested on another one);
    None when the torch side (catsdogs.training) is not installed."""
    try:
        from catsdogs.training.evaluate import evaluator_on_test_split
    except ImportError:
        return None
    return evaluator_on_test_split(settings)


@app.command()
def promote(
    version: Annotated[
        int | None, typer.Option("--version", help="Version to promote (default: the challenger).")
    ] = None,
    reason: ReasonOption = "",
    require_shadow: Annotated[
        int,
        typer.Option(
            "--require-shadow",
            min=0,
            help="Also require N live requests shadowed by it, labelled accuracy there >= the champion's.",
        ),
    ] = 0,
) -> None:
    """Move the `champion` alias to the challenger if it passes the quality gate (exit 1 if refused)."""
    from catsdogs.registry import promote as promote_version

    settings = get_settings()
    decision = promote_version(
        settings,
        version=version,
        reason=reason,
        evaluate=_champion_evaluator(settings),
        require_shadow=require_shadow,
    )
    typer.echo(decision.table())
    typer.echo(decision.message)
    if not decision.accepted:
        raise typer.Exit(1)


@app.command()
def rollback(reason: ReasonOption = "") -> None:
    """Move the `champion` alias back to the previous champion."""
    from catsdogs.registry import rollback as rollback_champion

    settings = get_settings()
    version = rollback_champion(settings, reason=reason)
    typer.echo(f"{settings.model_name}: champion is now v{version}")


@models_app.command("list")
def models_list() -> None:
    """Every registered version with its aliases and test metrics."""
    from datetime import UTC, datetime

    from rich.table import Table

    from catsdogs.registry import list_versions

    settings = get_settings()
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
