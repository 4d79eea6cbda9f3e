"""Benchmark ``catsdogs data ingest`` on the full Kaggle archive (20,000 JPEGs).

Runs the real CLI under GNU ``/usr/bin/time -v`` into a throw-away data folder and writes
``benchmarks/results/ingest.json``:

- ``images_per_s``: files processed per wall-clock second, everything included (process start,
  decode, SHA-256, pHash, store writes, duplicate search, split, manifest);
- ``images_per_cpu_s``: files per CPU-second (user + system, main process and workers): what the
  code costs, whatever else the shared machine was running;
- ``peak_rss_mb``: GNU time's "Maximum resident set size", i.e. the largest single process
  (the main process or one worker);
- ``peak_tree_pss_mb``: the largest sum of PSS (proportional set size: shared pages counted once)
  over the main process and its workers, sampled every 0.25 s with psutil. This is the figure to
  compare with a memory budget, because forked workers share the parent's pages.

Usage: ``python benchmarks/bench_ingest.py [--source PATH] [--workers N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"
RESULT = REPO / "benchmarks" / "results" / "ingest.json"


def _sample_tree_pss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        except psutil.NoSuchProcess:
            return
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.25)


def _time_field(stderr: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}: (.+)$", stderr, re.MULTILINE)
    if not match:
        raise SystemExit(f"/usr/bin/time output has no {label!r}:\n{stderr[-2000:]}")
    return match.group(1).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    gnu_time = shutil.which("time", path="/usr/bin") or "/usr/bin/time"
    if not Path(gnu_time).is_file():
        raise SystemExit("GNU time is missing: apt-get install -y time")
    out = Path(tempfile.mkdtemp(prefix="catsdogs-bench-ingest-"))
    command = [sys.executable, "-m", "catsdogs", "data", "ingest", "--source", str(args.source)]
    command += ["--data-dir", str(out / "data")]
    if args.workers:
        command += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_PARAMS_FILE": str(out / "none.yaml")}
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [gnu_time, "-v", *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stop, peak = threading.Event(), [0.0]
        sampler = threading.Thread(target=_sample_tree_pss, args=(proc.pid, stop, peak), daemon=True)
        sampler.start()
        _, stderr = proc.communicate()
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"ingest failed ({proc.returncode}):\n{stderr[-3000:]}")
        report = json.loads((out / "data" / "data_report.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    counts = report["counts"]
    # user + system time of the whole tree (workers are reaped by the main process, so GNU time
    # counts them): the cost per image independent of how busy the shared machine was.
    cpu_seconds = float(_time_field(stderr, "User time (seconds)")) + float(
        _time_field(stderr, "System time (seconds)")
    )
    result = {
        "benchmark": "ingest",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["catsdogs", *command[3:]]),
        "source": str(args.source),
        "images": counts["files"],
        "accepted": counts["accepted"],
        "manifest_rows": counts["manifest_rows"],
        "seconds": round(seconds, 2),
        "images_per_s": round(counts["files"] / seconds, 1),
        "peak_rss_mb": round(int(_time_field(stderr, "Maximum resident set size (kbytes)")) / 1024, 1),
        "peak_tree_pss_mb": round(peak[0], 1) if peak[0] else None,
        "cpu_seconds": round(cpu_seconds, 1),
        "images_per_cpu_s": round(counts["files"] / cpu_seconds, 1),
        "cpu_percent": _time_field(stderr, "Percent of CPU this job got"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "targets": {"images_per_s": 300, "peak_rss_mb": 500},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
