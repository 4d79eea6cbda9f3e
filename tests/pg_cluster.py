"""A throwaway PostgreSQL cluster on loopback, from Debian's server binaries (``postgresql``).

Debian keeps ``initdb`` and ``pg_ctl`` in /usr/lib/postgresql/<version>/bin, off PATH; PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres`` user (or ``nobody``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import free_port, require_tool

SUPERUSER = "catsdogs"


def server_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest Debian version's folder."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda path: int(path.parts[-3].split(".")[0])
    )
    if found:
        return found[-1].parent
    return Path(require_tool("pg_ctl")).parent  # skips here, fails under CI=true


def _as_owner(owner: str | None, command: list[str]) -> list[str]:
    return command if owner is None else [require_tool("runuser"), "-u", owner, "--", *command]


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster in a temporary folder on a free loopback port; yields its base URL (no
    database), e.g. ``postgresql+psycopg://catsdogs@127.0.0.1:5433``. Removed on exit."""
    bindir = server_bindir()
    owner = None
    if os.geteuid() == 0:
        owner = "postgres" if any(u.pw_name == "postgres" for u in pwd.getpwall()) else "nobody"
    root = Path(tempfile.mkdtemp(prefix="catsdogs-pg-"))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        subprocess.run(_as_owner(owner, list(command)), check=True, capture_output=True, timeout=60)

    try:
        run(
            str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "--no-sync", "-E", "UTF8"
        )
        options = f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(
            str(bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "30",
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-o",
            options,
        )
        try:
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}"
        finally:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w")
    except subprocess.CalledProcessError as exc:
        log = root / "log"
        raise AssertionError(
            f"{exc.cmd} failed: {exc.stderr.decode(errors='replace')}"
            + (log.read_text(errors="replace") if log.exists() else "")
        ) from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    """A fresh database in the cluster; its URL."""
    import psycopg

    with psycopg.connect(base_url.replace("+psycopg", "") + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"
