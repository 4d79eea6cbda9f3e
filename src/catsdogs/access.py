"""Who can reach a service, and with which keys: the loopback check behind "closed unless configured
open", and the prediction-id signing keys (``kid:secret`` entries, a key id derived from a bare
secret). Plain functions over strings, so the settings object validates with them and the services
read their results without parsing anything twice."""

from __future__ import annotations

import hashlib
import ipaddress
import re

_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def is_loopback(host: str) -> bool:
    """``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or "" for every interface) may resolve to anything
        return False


def derived_kid(secret: str) -> str:
    """The key id of a signing key given without one: a short hash of it, stable across restarts."""
    return hashlib.sha256(b"catsdogs-feedback-kid:" + secret.encode()).hexdigest()[:8]


def signing_keys(single: str | None, entries: list[str]) -> list[tuple[str, str]]:
    """``(kid, secret)`` pairs, the signing one first: one ``single`` secret, or ``kid:secret`` and
    bare-secret ``entries``; a bare secret gets :func:`derived_kid` in either form, so moving a key
    between the two keeps its ids valid.

    Raises:
        ValueError: an entry whose kid is not 1-32 of A-Z a-z 0-9 - _, or whose secret is empty.
    """
    if single:
        return [(derived_kid(single), single)]
    keys = []
    for entry in entries:
        kid, sep, secret = entry.partition(":")
        if not sep:
            kid, secret = derived_kid(kid), kid
        if not _KID.fullmatch(kid) or not secret:
            raise ValueError(
                "a feedback_secrets entry is kid:secret (kid: 1-32 of A-Z a-z 0-9 - _) or a bare secret"
            )
        keys.append((kid, secret))
    return keys
