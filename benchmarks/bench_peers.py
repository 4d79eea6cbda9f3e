"""`catsdogs serve` side by side with what a user would pick instead, in one run, on one bundle.

Peers, each started on the same bundle's ``model.onnx`` and driven with the same images. In each
round (``--repeats``) every peer is started, then each image set and concurrency level is run on
every peer back to back (their order turning from round to round), so that a CPU whose speed drifts
over minutes hits the peers of one level alike; idle peers wait on their sockets meanwhile:

  * ``catsdogs``  — `catsdogs serve` with its production settings: API keys on, a feedback secret,
    JSON access logs at INFO, drift sampling and metrics (recorded in the result's ``service_env``);
  * ``naive``     — ``peers/naive_fastapi.py``: a sync FastAPI route, Pillow decode, squash resize,
    one ONNX Runtime call, nothing else (the endpoint a user writes in ten minutes);
  * ``bentoml``   — ``peers/bentoml_service.py``: BentoML with adaptive batching as its documentation
    configures it, installed from ``peers/bentoml-requirements.txt`` into its own venv (reported,
    not targeted; ``--no-bentoml`` or ``--quick`` leave it out);
  * ``catsdogs_int8`` — the same service on the bundle's INT8 graph, when it has one;
  * ``catsdogs_shadow`` — with ``--shadow-fraction F``, the service shadow-scoring that share of
    its requests with the same bundle (what shadow testing costs the answers);
  * ``catsdogs_baseline`` (and ``catsdogs_baseline_int8``) — with ``--baseline-bundle``, the same
    service on another bundle (an earlier export of the same weights: what a change to the graph or
    its use costs);
  * ``raw``       — ONNX Runtime without HTTP on the same file: the service's thread layout and the
    best batch size, on tensors in memory (``bench_serve.raw_ort``); and ``raw_from_jpeg``, the
    service's layout fed the JPEG bytes through the one decode and preprocessing (what any
    pipeline pays per photo before HTTP and the service's own work).

For dataset-size and phone-size (4032×3024) JPEGs at concurrency 1, 4, 16, 64 it records requests/s,
p50/p99 and RSS, and the ratios catsdogs ÷ each peer (medians over the repeats): throughput ratios
(≥ 1 is better for catsdogs) and, at concurrency 1, the p50 latency ratio (≤ 1 is better); with
a shadowing peer, its p50 and p99 over the service's alone (``shadow_cost/...``, paired by round).

    python benchmarks/bench_peers.py --bundle BUNDLE [--baseline-bundle OLD] [--quick] [--no-bentoml]
        [--shadow-fraction F] [--skip naive,catsdogs_int8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # the sibling script: inputs, load generators, RSS, raw ONNX Runtime

PEERS_DIR = Path(__file__).resolve().parent / "peers"
API_KEY = "bench-peers-key"
#: What `catsdogs serve` runs with here: what a production deployment turns on.
SERVICE_ENV = {
    "CATSDOGS_API_KEYS": API_KEY,
    "CATSDOGS_FEEDBACK_SECRET": "bench-peers-feedback-secret",
    "CATSDOGS_LOG_LEVEL": "INFO",
    # The per-key rate limit stays on (its cost is measured) but above what one load generator sends.
    "CATSDOGS_RATE_LIMIT_PER_MINUTE": "100000000",
}


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} never became ready:\n{log.read_text(errors='replace')[-3000:]}")


def start_process(command: list[str], env: dict[str, str], ready_path: str, tmp: Path, name: str, port: int):
    log = tmp / f"{name}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command, env={**os.environ, **env}, cwd=PEERS_DIR, stdout=subprocess.DEVNULL, stderr=log_file
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + ready_path, log)
    return proc, url


def start_catsdogs(
    bundle: Path, tmp: Path, *, int8: bool = False, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    env = {**SERVICE_ENV, "CATSDOGS_SERVE_INT8": "true"} if int8 else dict(SERVICE_ENV)
    proc, url, _ = bench_serve.start_server(bundle, {**env, **(extra or {})}, tmp)
    return proc, url


def start_naive(bundle: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = bench_serve.free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "naive_fastapi:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    command += ["--log-level", "warning"]
    return start_process(command, {"BUNDLE": str(bundle)}, "/openapi.json", tmp, "naive", port)


def bentoml_venv(cache: Path) -> Path:
    """BentoML in its own venv (its dependencies must not touch the project's), made once."""
    requirements = PEERS_DIR / "bentoml-requirements.txt"
    venv = cache / "bentoml-venv"
    stamp = venv / "requirements.txt"
    if not (stamp.exists() and stamp.read_text() == requirements.read_text()):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(requirements)], check=True)
        shutil.copyfile(requirements, stamp)
    return venv


def start_bentoml(bundle: Path, tmp: Path, venv: Path) -> tuple[subprocess.Popen, str]:
    port = bench_serve.free_port()
    command = [str(venv / "bin" / "bentoml"), "serve", "bentoml_service:CatsDogs", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    env = {"BUNDLE": str(bundle), "BENTO_WORKERS": "1", "BENTOML_HOME": str(tmp / "bentoml-home")}
    return start_process(command, env, "/readyz", tmp, "bentoml", port)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


SHADOW_COUNTERS = ("predictions", "skipped", "failures")


def shadow_counts(url: str) -> dict[str, float]:
    """What the shadow did during the run, from the service's ``/metrics`` (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = {f"catsdogs_shadow_{name}": name for name in SHADOW_COUNTERS}
    counts = dict.fromkeys(SHADOW_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in names:
            counts[names[family.name]] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return counts


@dataclass
class Running:
    """One peer's server during a round, and what was measured on it."""

    name: str
    proc: subprocess.Popen
    url: str
    result: dict = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        return API_KEY if self.name.startswith("catsdogs") else None


def warm_up(peer: Running, images: dict[str, list[Path]], args: argparse.Namespace, tmp: Path) -> None:
    """A few seconds of load; a shadowing peer also waits until its own model process scores."""
    first = next(iter(images.values()))
    bench_serve.run_load(peer.url, first, 4, 2.0, tmp, client=args.client, api_key=peer.key)
    if peer.name == "catsdogs_shadow":
        deadline = time.monotonic() + 120
        while shadow_counts(peer.url)["predictions"] == 0 and time.monotonic() < deadline:
            bench_serve.run_load(peer.url, first, 1, 1.0, tmp, client=args.client, api_key=peer.key)
    peer.result["rss_mb_ready"] = bench_serve.rss_mb(peer.proc.pid)


def measure_round(
    starters: dict[str, Callable[[], tuple[subprocess.Popen, str]]],
    images: dict[str, list[Path]],
    args: argparse.Namespace,
    tmp: Path,
    *,
    round_index: int,
    rss_requests: dict[str, int],
) -> dict[str, dict]:
    """One round: every peer started and warmed up, then each image set and level on every peer in
    turn; then each peer topped up to its ``rss_requests`` before its RSS is read (the service's
    memory bar)."""
    peers: list[Running] = []
    try:
        for name, start in starters.items():
            peers.append(Running(name, *start()))
        for peer in peers:
            warm_up(peer, images, args, tmp)
        turn = round_index % len(peers)
        for kind, files in images.items():
            for level in args.levels:
                for peer in peers[turn:] + peers[:turn]:
                    run = bench_serve.run_load(
                        peer.url, files, level, args.seconds, tmp,
                        pid=peer.proc.pid, client=args.client, api_key=peer.key,
                    )  # fmt: skip
                    peer.result.setdefault(kind, []).append(run)
        first = next(iter(images.values()))
        for peer in peers:
            done = sum(r["requests"] for kind in images for r in peer.result[kind])
            wanted = rss_requests.get(peer.name, 0)
            if wanted > done:
                bench_serve.run_load(
                    peer.url, first, 16, 0, tmp, total=wanted - done, client=args.client, api_key=peer.key
                )
            peer.result["requests_before_rss"] = max(done, wanted)
            peer.result["rss_mb_after_requests"] = bench_serve.rss_mb(peer.proc.pid)
            if peer.name == "catsdogs_shadow":  # proof that the shadow scored its share, or what it skipped
                peer.result["shadow"] = shadow_counts(peer.url)
    finally:
        for peer in peers:
            stop(peer.proc)
    return {peer.name: peer.result for peer in peers}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def answered_rps(level: dict) -> float:
    """Requests per second answered 200: a peer shedding load with 503s gets no credit for them."""
    answered = sum(n for code, n in level["statuses"].items() if str(code) == "200")
    return answered / level["seconds"] if level["seconds"] else 0.0


def ratios(runs: dict[str, list[dict]], raw: dict, kinds: list[str], levels: list[int]) -> dict:
    """catsdogs ÷ each peer, per image kind and level: answered requests/s (:func:`answered_rps`),
    and p50 latency at concurrency 1."""
    out: dict = {}
    for peer in (p for p in runs if p != "catsdogs"):
        for kind in kinds:
            for i, level in enumerate(levels):
                pairs = list(zip(runs["catsdogs"], runs[peer], strict=True))
                out[f"{kind}/c{level}/rps_vs_{peer}"] = _median(
                    [answered_rps(a[kind][i]) / max(answered_rps(b[kind][i]), 1e-9) for a, b in pairs]
                )
                if level == 1:
                    out[f"{kind}/c1/p50_vs_{peer}"] = _median(
                        [a[kind][i]["p50_ms"] / b[kind][i]["p50_ms"] for a, b in pairs]
                    )
    if "catsdogs_shadow" in runs:  # what shadow testing costs the answers: with ÷ without, per round
        pairs = list(zip(runs["catsdogs_shadow"], runs["catsdogs"], strict=True))
        for kind in kinds:
            for i, level in enumerate(levels):
                for stat in ("p50_ms", "p99_ms"):
                    out[f"shadow_cost/{kind}/c{level}/{stat[:3]}_with_over_without"] = _median(
                        [a[kind][i][stat] / b[kind][i][stat] for a, b in pairs]
                    )
    if "dataset" in kinds and 16 in levels:
        i = levels.index(16)
        references = [
            ("raw_best", raw["best_images_per_s"]),
            ("raw_server_layout", raw["server_images_per_s"]),
        ]
        if raw.get(bench_serve.FROM_JPEG):
            references.append(("raw_from_jpeg", raw[bench_serve.FROM_JPEG]["images_per_s"]))
        for name, rate in references:
            out[f"dataset/c16/rps_vs_{name}"] = _median(
                [answered_rps(r["dataset"][i]) / rate for r in runs["catsdogs"]]
            )
    return out


def failures(runs: dict[str, list[dict]], kinds: list[str]) -> dict[str, int]:
    return {
        peer: sum(
            n
            for run in peer_runs
            for kind in kinds
            for level in run[kind]
            for code, n in level["statuses"].items()
            if str(code) != "200"
        )
        for peer, peer_runs in runs.items()
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--archive", type=Path, default=bench_serve.DATASET, help="the dataset zip")
    parser.add_argument(
        "--quick", action="store_true", help="c1 and c16, dataset JPEGs, one round, no BentoML"
    )
    parser.add_argument("--baseline-bundle", type=Path, help="also serve this bundle, as a baseline")
    parser.add_argument(
        "--shadow-fraction", type=float, help="also serve with this share shadow-scored (same bundle)"
    )
    parser.add_argument("--no-bentoml", action="store_true")
    parser.add_argument("--skip", default="", help="peers not to run, e.g. naive,catsdogs_int8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument("--cache", type=Path, default=Path(".cache/catsdogs/bench"), help="BentoML's venv")
    parser.add_argument(
        "--client", choices=("wrk", "aiohttp"), default="wrk" if shutil.which("wrk") else "aiohttp"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers.json")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.seconds, args.repeats, args.rss_requests, args.no_bentoml = "1,16", 2.0, 1, 0, True
    args.levels = [int(x) for x in str(args.levels).split(",")]
    return args


def main() -> None:
    args = parse_args()
    bench_serve.DATASET = args.archive
    bundle = args.bundle.resolve()
    with tempfile.TemporaryDirectory(prefix="catsdogs-peers-") as tmp_name:
        tmp = Path(tmp_name)
        jpegs = bench_serve.dataset_jpegs(16 if args.quick else 64)
        images = {"dataset": bench_serve.write_inputs(tmp, "d", jpegs)}
        if not args.quick:
            images["phone_4032x3024"] = [
                tmp / f"phone_{i}.jpg" for i in range(len(bench_serve.phone_jpegs(jpegs, 6, tmp)))
            ]
        settings = bench_serve.server_settings(SERVICE_ENV, tmp)
        raw = bench_serve.raw_ort(bundle, jpegs, seconds=1.0 if args.quick else 3.0, settings=settings)
        starters: dict[str, Callable[[], tuple[subprocess.Popen, str]]] = {
            "catsdogs": lambda: start_catsdogs(bundle, tmp),
            "naive": lambda: start_naive(bundle, tmp),
        }
        if (bundle / "model.int8.onnx").exists() and not args.quick:
            starters["catsdogs_int8"] = lambda: start_catsdogs(bundle, tmp, int8=True)
        if args.baseline_bundle is not None:
            baseline = args.baseline_bundle.resolve()
            starters["catsdogs_baseline"] = lambda: start_catsdogs(baseline, tmp)
            if "catsdogs_int8" in starters and (baseline / "model.int8.onnx").exists():
                starters["catsdogs_baseline_int8"] = lambda: start_catsdogs(baseline, tmp, int8=True)
        if args.shadow_fraction:
            shadow = {
                "CATSDOGS_SHADOW_FRACTION": str(args.shadow_fraction),
                "CATSDOGS_SHADOW_MODEL_URI": str(bundle),
            }
            starters["catsdogs_shadow"] = lambda: start_catsdogs(bundle, tmp, extra=shadow)
        if not args.no_bentoml:
            venv = bentoml_venv(args.cache.resolve())
            starters["bentoml"] = lambda: start_bentoml(bundle, tmp, venv)
        for name in filter(None, args.skip.split(",")):
            if name == "catsdogs" or starters.pop(name, None) is None:
                raise SystemExit(f"--skip: no peer {name!r} to skip (peers: {', '.join(starters)})")
        runs: dict[str, list[dict]] = {name: [] for name in starters}
        for repeat in range(args.repeats):
            # The 10,000-request memory check is the service's bar: once, in its last round.
            last = repeat == args.repeats - 1
            rss = {"catsdogs": args.rss_requests} if last else {}
            measured = measure_round(starters, images, args, tmp, round_index=repeat, rss_requests=rss)
            for name, result in measured.items():
                runs[name].append(result)
    kinds = list(images)
    result = {
        "started_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "bundle": str(bundle),
        "client": args.client,
        "levels": args.levels,
        "repeats": args.repeats,
        "service_env": {k: ("<set>" if "KEY" in k or "SECRET" in k else v) for k, v in SERVICE_ENV.items()},
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "raw_onnxruntime": raw,
        "runs": runs,
        "non_200": failures(runs, kinds),
        "ratios_catsdogs_over_peer": ratios(runs, raw, kinds, args.levels),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(json.dumps({k: result[k] for k in ("non_200", "ratios_catsdogs_over_peer")}, indent=2))


if __name__ == "__main__":
    main()
