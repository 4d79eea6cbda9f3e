"""`catsdogs quickstart` (what `make demo` runs) as a new user meets it: from nothing to an answer.

Usage:
    python benchmarks/bench_quickstart.py [--source PATH_OR_URL] [--per-class N]

Runs the real command in a fresh folder (no data, no feature cache, no MLflow store), waits for the
upload page's URL, posts one cat photo to ``/predict``, then stops it with Ctrl-C (SIGINT). Writes
the seconds to the URL and to the first answer, the command's own step times, the machine's load
average (this machine is shared: compare against the idle target with it in mind) to
``benchmarks/results/quickstart.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quickstart.json"
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"
URL = re.compile(r"upload page: (\S+)")
STEPS = re.compile(r"(\w+) (\d+) s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(source: str, per_class: int | None, work: Path) -> dict[str, object]:
    out = work / "stdout.txt"
    command = [sys.executable, "-m", "catsdogs", "quickstart", "--dir", str(work / "demo")]
    command += ["--port", str(free_port())]
    command += ["--per-class", str(per_class)] if per_class else []
    env = {**os.environ, "CATSDOGS_DATA_SOURCE": source, "PYTHONPATH": str(REPO / "src")}
    load_before = os.getloadavg()
    started = time.monotonic()
    with out.open("wb") as stdout:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        while not (found := URL.search(out.read_text())):
            if proc.poll() is not None:
                sys.exit(f"quickstart exited with {proc.returncode}:\n{out.read_text()}")
            time.sleep(0.5)
        to_url = time.monotonic() - started
        photo = next((work / "demo" / "data" / "images" / "cat").iterdir())  # one the demo ingested
        answer = requests.post(
            f"{found[1]}predict", files={"file": ("cat.jpg", photo.read_bytes())}, timeout=60
        )
        answer.raise_for_status()
        to_answer = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    printed = out.read_text()
    steps = next(line for line in printed.splitlines() if line.startswith("time:"))
    return {
        "command": "catsdogs quickstart" + (f" --per-class {per_class}" if per_class else ""),
        "seconds_to_url": round(to_url, 1),
        "seconds_to_first_answer": round(to_answer, 1),
        "steps_s": {name: int(s) for name, s in STEPS.findall(steps)},
        "answer": {k: answer.json()[k] for k in ("label", "confidence", "model_version")},
        "summary": printed.splitlines()[:3],
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--per-class", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as work:
        result = run(args.source, args.per_class, Path(work))
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
