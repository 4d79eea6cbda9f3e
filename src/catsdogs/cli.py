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


# --- monitoring --------------------------------------------------------------------------------


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
