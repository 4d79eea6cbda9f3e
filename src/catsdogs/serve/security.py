"""API keys for the prediction endpoints and the admin token, as FastAPI dependencies, and who may
see the service's operational details.

Keys are read from ``X-API-Key`` or ``Authorization: Bearer``; comparison is constant-time and
nothing secret is ever logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from catsdogs.serve.errors import ApiError


def presented_key(request: Request, header: str) -> str | None:
    """The credential a client sent, from the named header or a bearer token."""
    value = request.headers.get(header)
    if value:
        return value
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(candidate: str, secrets_: list[str]) -> bool:
    # Compare against every key so timing does not tell which one nearly matched.
    found = False
    for secret in secrets_:
        found |= hmac.compare_digest(candidate.encode(), secret.encode())
    return found


async def require_api_key(request: Request) -> None:
    """401 without a key, 403 with a wrong one; open when no keys are configured.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency on its thread pool,
    one thread hop per request for a few string comparisons.
    """
    keys: list[str] = request.app.state.service.api_keys
    if not keys:
        return
    key = presented_key(request, "x-api-key")
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required (X-API-Key header)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches(key, keys):
        raise ApiError(403, "forbidden", "the API key is not valid")


async def require_admin(request: Request) -> None:
    """401 without the admin token, 403 with a wrong one (the router is not mounted without a token)."""
    token: str | None = request.app.state.service.admin_token
    presented = presented_key(request, "x-admin-token")
    if presented is None:
        raise ApiError(
            401,
            "unauthorized",
            "the admin token is required (X-Admin-Token header)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if token is None or not _matches(presented, [token]):
        raise ApiError(403, "forbidden", "the admin token is not valid")


def sees_details(request: Request) -> bool:
    """Whether the caller may read operational details (registry URL, version tags, paths, errors).

    With API keys configured: only a caller presenting a valid key or the admin token. Without keys:
    only when the service listens on loopback (a developer's own machine); a service opened to anyone
    on purpose (``allow_anonymous``) shows them to nobody.
    """
    service = request.app.state.service
    if not service.api_keys:
        return bool(service.settings.loopback_only)
    secrets_ = [*service.api_keys, *([service.admin_token] if service.admin_token else [])]
    presented = {presented_key(request, "x-api-key"), presented_key(request, "x-admin-token")}
    return any(_matches(key, secrets_) for key in presented if key)
