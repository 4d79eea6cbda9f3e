"""A mistyped command line gets click's usage message and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["no-such-command"], "No such command 'no-such-command'"),
        (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["export"], "Missing option '--model-uri'"),
    ],
)
def test_a_usage_error_is_a_short_message_with_exit_code_2(arguments: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "catsdogs", *arguments], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 4
