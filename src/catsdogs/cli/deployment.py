"""``catsdogs deploy`` and ``deploy rollback``: the API on Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from catsdogs import CatsdogsError
from catsdogs.cli.common import NamespaceOption, TimeoutOption, console
from catsdogs.settings import get_settings

app = typer.Typer(
    help="Ship the API to Kubernetes: apply an overlay, wait, smoke-test, roll back on failure.",
    invoke_without_command=True,
)


@app.callback()
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
    namespace: NamespaceOption = None,
    timeout: TimeoutOption = None,
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
    settings = get_settings(deploy_namespace=namespace, deploy_timeout_s=timeout)
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


@app.command("rollback")
def deploy_rollback_command(
    namespace: NamespaceOption = None,
    to_revision: Annotated[
        int | None, typer.Option("--to-revision", help="Revision to return to (default: the previous one).")
    ] = None,
    timeout: TimeoutOption = None,
) -> None:
    """Undo the API Deployment's last rollout (not the registry alias: that is `catsdogs rollback`)."""
    from catsdogs import deploy

    settings = get_settings(deploy_namespace=namespace, deploy_timeout_s=timeout)
    deploy.rollback(
        namespace=settings.deploy_namespace,
        deployment=settings.deploy_deployment,
        to_revision=to_revision,
        timeout_s=settings.deploy_timeout_s,
        kubectl=deploy.Kubectl(settings.kubectl, context=settings.kube_context),
    )
    console.print(f"rolled back {settings.deploy_namespace}/{settings.deploy_deployment}")
