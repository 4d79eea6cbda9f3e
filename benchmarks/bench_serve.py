"""End-to-end serving benchmark on loopback: `catsdogs serve` + a wrk (or aiohttp) load generator.

Measures, in one run and on one machine:
  * raw ONNX Runtime throughput of the very file the server serves (``model.int8.onnx`` with
    CATSDOGS_SERVE_INT8=true), in the server's own thread layout and in the usual best layouts (one
    session on every core at batch 1/8/32, one single-threaded caller per core); the best layout
    is the reference for the c16/raw ratio,
  * server CPU-ms per request (from /proc: robust to other jobs on the machine, unlike req/s),
  * time from process start to `/ready` (cached/local model),
  * throughput and p50/p95/p99 latency at concurrency 1, 4, 16, 64 with the dataset's JPEGs
    and with phone-size JPEGs (4032x3024, made by upscaling dataset images in a temp dir),
  * server RSS after ready, after N requests, and after a burst of bad/huge uploads.

The load generator runs in its own process and sends prebuilt multipart bodies, round-robin.
It shares the cores with the server, so it should be light: ``--client wrk`` (the default when
``wrk`` is on PATH; ``apt-get install wrk``) is a C program driven by ``wrk_multipart.lua``.
``--client aiohttp`` (the fallback) is pure Python and costs several times more CPU per request.
Each run reports ``loadgen_cpu_ms_per_request`` for either client; the top-level ``client`` key
says which one ran. The bad-upload check always uses aiohttp, because it fails loudly when a
connection drops. Results: benchmarks/results/serve.json + a markdown table.

    python benchmarks/bench_serve.py --bundle /path/to/bundle [--quick] [--client wrk|aiohttp]
        [--env CATSDOGS_BATCH_MAX_SIZE=8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"
BOUNDARY = "catsdogsbenchboundary"
WRK_SCRIPT = Path(__file__).resolve().with_name("wrk_multipart.lua")


# --- inputs -------------------------------------------------------------------------------------
def dataset_jpegs(n: int) -> list[bytes]:
    with zipfile.ZipFile(DATASET) as archive:
        names = [f"train/{label}.{i}.jpg" for i in range(n // 2) for label in ("cat", "dog")]
        return [archive.read(name) for name in names]


def phone_jpegs(sources: list[bytes], n: int, folder: Path) -> list[bytes]:
    """4032x3024 JPEGs made by upscaling dataset images (written to a temp dir, never to git)."""
    from PIL import Image

    out = []
    for i, data in enumerate(sources[:n]):
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
        path = folder / f"phone_{i}.jpg"
        image.save(path, format="JPEG", quality=90)
        out.append(path.read_bytes())
    return out


def write_inputs(folder: Path, prefix: str, images: list[bytes]) -> list[Path]:
    """The images as files (the load generators read files), in a temp folder, never in git."""
    paths = []
    for i, data in enumerate(images):
        paths.append(folder / f"{prefix}{i}.jpg")
        paths[-1].write_bytes(data)
    return paths


def multipart(data: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


# --- raw ONNX Runtime ----------------------------------------------------------------------------
def server_settings(env: dict[str, str], cache: Path) -> Any:
    """The settings the server will run with: the same ``--env`` values, no params file."""
    from catsdogs.settings import Settings

    saved = dict(os.environ)
    os.environ.update({"CATSDOGS_PARAMS_FILE": str(cache / "none.yaml"), **env})
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


#: One unit of raw work for caller ``k``; returns how many images it did.
Step = Callable[[int], int]


def _throughput(step: Step, threads: int, seconds: float) -> tuple[float, float]:
    """Images/s of ``threads`` callers running ``step`` back to back (ORT releases the GIL; ``step(k)``
    does one unit of work and returns its image count), and the CPU-ms this process spent per image
    (robust to other jobs on the machine, unlike images/s)."""
    import threading

    step(0)
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def call(k: int) -> None:
        while time.perf_counter() < deadline:
            counts[k] += step(k)

    started, cpu_started = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=call, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    cpu = time.process_time() - cpu_started
    images = max(1, sum(counts))
    return round(images / (time.perf_counter() - started), 1), round(cpu * 1000 / images, 2)


def _tensors(session: Any, batch: np.ndarray) -> Step:
    """One forward pass per call on a batch already preprocessed in memory: the bare model."""
    from catsdogs.runtime import run_logits

    def step(_k: int) -> int:
        run_logits(session, batch)
        return len(batch)

    return step


def _from_jpegs(session: Any, jpegs: list[bytes], config: Any, threads: int) -> Step:
    """One image per call from its JPEG bytes: the one decode and preprocessing, then the forward
    pass; each caller walks its own stride of ``jpegs``."""
    from catsdogs.preprocessing import decode_for_model, preprocess
    from catsdogs.runtime import run_logits

    turns = list(range(threads))

    def step(k: int) -> int:
        data = jpegs[turns[k] % len(jpegs)]
        turns[k] += threads
        run_logits(session, preprocess(decode_for_model(data, config), config)[None])
        return 1

    return step


def raw_configs(settings: Any) -> dict[str, dict[str, int]]:
    """The bare-model layouts to try: the server's own, and the usual best ones on this machine."""
    from catsdogs.runtime import available_cores
    from catsdogs.serve.model_store import batch_size, inference_workers

    cores = available_cores()
    workers = inference_workers(settings)
    intra = settings.ort_intra_threads or max(1, cores // workers)
    return {
        # What the server runs: each process's inference workers share one session.
        "server": {
            "intra_op_threads": intra,
            "callers": workers * max(1, settings.workers),
            "batch": batch_size(settings),
        },
        "one_session_all_cores_b1": {"intra_op_threads": cores, "callers": 1, "batch": 1},
        "one_session_all_cores_b8": {"intra_op_threads": cores, "callers": 1, "batch": 8},
        "one_session_all_cores_b32": {"intra_op_threads": cores, "callers": 1, "batch": 32},
        "single_thread_callers_b1": {"intra_op_threads": 1, "callers": cores, "batch": 1},
        "single_thread_callers_b8": {"intra_op_threads": 1, "callers": cores, "batch": 8},
    }


def _paired(server: dict, tensors: Step, from_jpegs: Step, seconds: float) -> dict:
    """The server layout from JPEG bytes, timed in turns with the same layout on tensors (three
    pairs, medians): the CPU's speed drifts over minutes here, so only a paired ratio is its cost."""
    rates: dict[str, list[float]] = {"tensors": [], "jpeg": []}
    cpu: list[float] = []
    for _ in range(3):
        rates["tensors"].append(_throughput(tensors, server["callers"], seconds)[0])
        rate, cpu_ms = _throughput(from_jpegs, server["callers"], seconds)
        rates["jpeg"].append(rate)
        cpu.append(cpu_ms)
    pairs = [jpeg / tensor for jpeg, tensor in zip(rates["jpeg"], rates["tensors"], strict=True)]
    return {
        **server,
        "batch": 1,
        "images_per_s": statistics.median(rates["jpeg"]),
        "cpu_ms_per_image": statistics.median(cpu),
        "paired_tensor_images_per_s": statistics.median(rates["tensors"]),
        "vs_tensors": round(statistics.median(pairs), 3),
    }


#: Not a bare-model layout: the server's layout fed JPEG bytes, decoded and preprocessed by the one
#: preprocessing definition on the same threads: what any pipeline must do per photo, without HTTP.
FROM_JPEG = "server_from_jpeg"


def raw_ort(
    bundle_dir: Path,
    jpegs: list[bytes],
    seconds: float,
    *,
    settings: Any,
    only: str | None = None,
) -> dict[str, object]:
    """Images/s of the bare model (preprocessed tensors in memory) on the very file the server serves.

    Every layout in :func:`raw_configs` is measured (or only ``only``); the best is the honest
    reference for the service, and ``server`` is the same thread layout the server uses. With it,
    :data:`FROM_JPEG` is that layout fed the JPEG bytes instead: what decoding and preprocessing
    alone cost against the bare model, so the ratio shows how much of the gap HTTP and the
    service's own work leave.
    """
    from catsdogs.bundle import find_bundle
    from catsdogs.preprocessing import decode_image, preprocess_batch
    from catsdogs.runtime import open_session
    from catsdogs.serve.model_store import session_options

    bundle = find_bundle(bundle_dir)
    model_file = bundle.onnx_path(int8=settings.serve_int8)
    images = [decode_image(data) for data in jpegs[:32]]
    batch32 = preprocess_batch(images, bundle.preprocessing)
    configs = raw_configs(settings)
    if only is not None:
        configs = {only: configs[only]}
    sessions: dict[int, Any] = {}
    measured = {}
    for name, config in configs.items():
        intra = config["intra_op_threads"]
        if intra not in sessions:
            options = session_options(settings.model_copy(update={"ort_intra_threads": intra}))
            sessions[intra] = open_session(model_file, options)
        batch = np.ascontiguousarray(batch32[: config["batch"]])
        rate, cpu_ms = _throughput(_tensors(sessions[intra], batch), config["callers"], seconds)
        measured[name] = {**config, "images_per_s": rate, "cpu_ms_per_image": cpu_ms}
    best = max(measured, key=lambda k: measured[k]["images_per_s"])
    from_jpeg = None
    if "server" in measured:
        server = measured["server"]
        session = sessions[server["intra_op_threads"]]
        tensors = _tensors(session, np.ascontiguousarray(batch32[: server["batch"]]))
        from_jpegs = _from_jpegs(session, jpegs, bundle.preprocessing, server["callers"])
        from_jpeg = _paired(server, tensors, from_jpegs, seconds)
    by_batch: dict[str, float] = {}
    for config in measured.values():
        key = str(config["batch"])
        by_batch[key] = max(by_batch.get(key, 0.0), config["images_per_s"])
    return {
        "model_file": model_file.name,
        "configs": measured,
        "best_config": best,
        "server_images_per_s": measured.get("server", {}).get("images_per_s"),
        FROM_JPEG: from_jpeg,
        # Kept from the earlier format: the best over every layout, per batch size and overall.
        "images_per_s_by_batch": by_batch,
        "best_batch": measured[best]["batch"],
        "best_images_per_s": measured[best]["images_per_s"],
        "intra_op_threads": measured[best]["intra_op_threads"],
    }


def draft_parity(bundle_dir: Path, files: list[Path], *, int8: bool) -> dict[str, object] | None:
    """The bundle's reduced-size DCT decoding (``decode_draft_factor`` in its preprocessing.json) vs
    full decoding of phone photos: speed and prediction change (``None``: the bundle does not draft)."""
    from catsdogs.bundle import find_bundle
    from catsdogs.preprocessing import decode_image, preprocess_batch, softmax
    from catsdogs.runtime import open_model, run_logits

    bundle = find_bundle(bundle_dir)
    config = bundle.preprocessing
    session = open_model(bundle.onnx_path(int8=int8), config)
    draft = config.draft_size
    if draft is None:
        return None
    diffs, agree, full_ms, draft_ms = [], 0, [], []
    for path in files:
        data = path.read_bytes()
        probs = []
        for size, times in ((None, full_ms), (draft, draft_ms)):
            t0 = time.perf_counter()
            image = decode_image(data, draft_size=size)
            times.append((time.perf_counter() - t0) * 1000)
            probs.append(softmax(run_logits(session, preprocess_batch([image], config)))[0])
        diffs.append(float(np.abs(probs[0] - probs[1]).max()))
        agree += int(np.argmax(probs[0]) == np.argmax(probs[1]))
    return {
        "draft_size": draft,
        "images": len(files),
        "max_abs_probability_diff": round(max(diffs), 5),
        "labels_agree": f"{agree}/{len(files)}",
        "decode_ms_full": round(float(np.mean(full_ms)), 1),
        "decode_ms_draft": round(float(np.mean(draft_ms)), 1),
    }


# --- the server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """A process and its direct children (uvicorn workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (workers), in MB."""
    total = 0.0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return round(total, 1)


def start_server(bundle: Path, env: dict[str, str], cache: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "CATSDOGS_LOG_LEVEL": "WARNING",
        "CATSDOGS_CACHE_DIR": str(cache),
        "CATSDOGS_PARAMS_FILE": str(cache / "none.yaml"),
        **env,
    }
    started = time.perf_counter()
    # The server's log goes to a file: an unread pipe fills up and blocks the server (at INFO level
    # it writes one access-log line per request).
    log = cache / "server.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "catsdogs", "serve", "--model-uri", str(bundle), "--port", str(port)],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    while time.perf_counter() - started < 60:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text(errors='replace')[-3000:]}")


# --- the load generator (own process) -------------------------------------------------------------
async def _load(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    total: int | None,
    api_key: str | None = None,
) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if api_key:
        headers["X-API-Key"] = api_key
    deadline = time.perf_counter() + seconds
    sent = 0

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal sent
        i = k
        while (time.perf_counter() < deadline) if total is None else (sent < total):
            sent += 1
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            async with session.post(f"{url}/predict", data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    lat = np.asarray(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "statuses": statuses,
        # The load generator shares the machine: its CPU per request is not available to the server.
        "loadgen_cpu_ms_per_request": round(cpu * 1000 / max(1, len(latencies)), 2),
    }


def loadgen_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    bodies = [
        multipart(Path(p).read_bytes()) if spec.get("multipart", True) else Path(p).read_bytes()
        for p in spec["files"]
    ]
    result = asyncio.run(
        _load(
            spec["url"], bodies, spec["concurrency"], spec["seconds"], spec.get("total"), spec.get("api_key")
        )
    )
    print(json.dumps(result))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run_load(
    url: str,
    files: list[Path],
    concurrency: int,
    seconds: float,
    tmp: Path,
    total: int | None = None,
    *,
    pid: int | None = None,
    client: str = "aiohttp",
    api_key: str | None = None,
) -> dict:
    """One load run in its own process; with ``pid``, also the server's CPU-ms per request."""
    cpu_before = cpu_seconds(pid) if pid else 0.0
    if client == "wrk":
        result = run_wrk(url, files, concurrency, seconds, tmp, total, api_key=api_key)
    else:
        result = run_aiohttp(url, files, concurrency, seconds, tmp, total, api_key=api_key)
    if pid:
        used = cpu_seconds(pid) - cpu_before
        result["server_cpu_ms_per_request"] = round(used * 1000 / max(1, result["requests"]), 2)
    return result


def run_aiohttp(
    url: str,
    files: list[Path],
    concurrency: int,
    seconds: float,
    tmp: Path,
    total: int | None,
    *,
    api_key: str | None = None,
) -> dict:
    """The aiohttp load generator (this file with ``--loadgen``) in a child process."""
    spec = tmp / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "url": url,
                "files": [str(f) for f in files],
                "concurrency": concurrency,
                "seconds": seconds,
                "total": total,
                "api_key": api_key,
            }
        )
    )
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", str(spec)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    return json.loads(out.stdout)


def wrk_bodies(files: list[Path], tmp: Path) -> Path:
    """Multipart bodies for ``files`` (the same bytes the aiohttp path sends) and the list wrk reads."""
    folder = tmp / "wrk-bodies"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, path in enumerate(files):
        body = folder / f"{path.stem}_{i}.body"
        if not body.exists():
            body.write_bytes(multipart(path.read_bytes()))
        paths.append(str(body))
    listing = folder / "list.txt"  # runs are sequential: one list at a time
    listing.write_text("\n".join(paths) + "\n")
    return listing


def _wrk_output(command: list[str], stops: int, *, tmp: Path) -> str:
    """Run wrk and return its stdout; with ``stops``, end it by SIGINT once that many threads have
    printed WRKDONE (wrk waits for its full ``-d`` otherwise, even with every thread stopped).

    wrk's own ``-d`` bounds the run, so this cannot hang on a server that stops answering.
    """
    stderr_path = tmp / "wrk.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # wrk writes nothing else until it ends
            lines.append(line)
            if stops and line.strip() == "WRKDONE":
                stops -= 1
                if not stops:
                    proc.send_signal(signal.SIGINT)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {stderr_path.read_text()[-2000:]}")
    return "".join(lines)


def run_wrk(
    url: str,
    files: list[Path],
    concurrency: int,
    seconds: float,
    tmp: Path,
    total: int | None,
    *,
    api_key: str | None = None,
) -> dict:
    """wrk (C, one thread) with ``wrk_multipart.lua``: same bodies and output keys as the aiohttp path.

    With ``total`` the script stops after that many responses; the duration is then only a bound.
    The CPU time of wrk comes from ``RUSAGE_CHILDREN`` around the run (wrk is the only child
    reaped in between), so it includes wrk's start-up and the reading of the bodies.
    """
    threads = 1  # One C thread sends thousands of req/s; a second would only take CPU from the server.
    duration = max(60, total) if total else max(1, math.ceil(seconds))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{max(concurrency, threads)}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "60s",
        "-s",
        str(WRK_SCRIPT),
        f"{url}/predict",
        "--",
        str(wrk_bodies(files, tmp)),
        BOUNDARY,
        str(total or 0),
        str(threads),
        api_key or "",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stdout = _wrk_output(command, threads if total else 0, tmp=tmp)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in stdout.splitlines() if line.startswith("WRKJSON ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result line:\n{stdout}")
    raw = json.loads(lines[-1].removeprefix("WRKJSON "))
    requests = int(raw["requests"])
    elapsed = raw["duration_us"] / 1e6
    statuses: dict[str, int] = dict(raw["statuses"])
    errors = raw["errors"]
    # Responses are counted per status code by the script; connection-level failures have no code.
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    if socket_errors:
        statuses["socket_error"] = socket_errors
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(requests / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(raw["p50_us"] / 1000, 1),
        "p95_ms": round(raw["p95_us"] / 1000, 1),
        "p99_ms": round(raw["p99_us"] / 1000, 1),
        "statuses": statuses,
        "loadgen_cpu_ms_per_request": round(cpu * 1000 / max(1, requests), 2),
    }


def bad_uploads(folder: Path, jpeg: bytes) -> list[Path]:
    """Odd and huge uploads for the memory-returns-to-baseline check."""
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
    big = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize((8000, 6000)).save(big, format="JPEG", quality=60)
    files = {
        "bomb.png": bomb,
        "text.jpg": b"not an image" * 100,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "48mp.jpg": big.getvalue(),
    }
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


# --- the run -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, required="--loadgen" not in sys.argv)
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="concurrency 16 on dataset JPEGs only (tuning)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--label", default="default")
    parser.add_argument(
        "--client",
        choices=("wrk", "aiohttp"),
        default="wrk" if shutil.which("wrk") else "aiohttp",
        help="load generator (default: wrk when installed, it costs the shared CPU far less per request)",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="result file (default: results/serve.json; a --quick run writes only when given one)",
    )  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))  # this checkout's code, not an installed copy
    if args.loadgen:
        loadgen_main(args.loadgen)
        return
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not installed (apt-get install wrk), or use --client aiohttp")
    env = dict(item.split("=", 1) for item in args.env)
    client = args.client
    levels = [16] if args.quick else [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="catsdogs-bench-") as tmp_name:
        tmp = Path(tmp_name)
        jpegs = dataset_jpegs(64)
        data_files = write_inputs(tmp, "d", jpegs)
        phone_files = (
            [] if args.quick else [tmp / f"phone_{i}.jpg" for i in range(len(phone_jpegs(jpegs, 6, tmp)))]
        )
        settings = server_settings(env, tmp)
        raw = raw_ort(args.bundle, jpegs, seconds=3.0, settings=settings)
        parity = draft_parity(args.bundle, phone_files, int8=settings.serve_int8) if phone_files else None
        proc, url, ready_s = start_server(args.bundle, env, tmp)
        try:
            result: dict[str, object] = {
                "label": args.label,
                "client": client,
                "bundle": str(args.bundle),
                "server_env": env,
                "machine": {
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_at_start": os.getloadavg(),
                },
                "raw_onnxruntime": raw,
                "draft_decode_parity": parity,
                "time_to_ready_s": round(ready_s, 2),
                "rss_mb_ready": rss_mb(proc.pid),
            }
            run_load(url, data_files, 4, 2.0, tmp, client=client)  # warm-up
            result["dataset"] = [
                run_load(url, data_files, c, args.seconds, tmp, pid=proc.pid, client=client) for c in levels
            ]
            if phone_files:
                result["phone_4032x3024"] = [
                    run_load(url, phone_files, c, args.seconds, tmp, pid=proc.pid, client=client)
                    for c in levels
                ]
            # Other jobs share the CPU and their load drifts by the minute: compare the service with
            # the bare model in alternating short rounds and report the median of the ratios.
            # The reference is the best bare-model layout (named in raw_onnxruntime.best_config).
            best = str(raw["best_config"])
            rounds = []
            for _ in range(3):
                bare = raw_ort(args.bundle, jpegs, seconds=3.0, settings=settings, only=best)
                load = run_load(url, data_files, 16, 4.0, tmp, pid=proc.pid, client=client)
                bare_rate = float(bare["best_images_per_s"])  # type: ignore[arg-type]
                bare_cpu = bare["configs"][best]["cpu_ms_per_image"]  # type: ignore[index]
                rounds.append(
                    {
                        "raw_config": best,
                        "raw_images_per_s": bare_rate,
                        "raw_cpu_ms_per_image": bare_cpu,
                        "c16_rps": load["throughput_rps"],
                        "c16_server_cpu_ms_per_request": load["server_cpu_ms_per_request"],
                        "ratio": round(load["throughput_rps"] / bare_rate, 3),
                    }
                )
            result["c16_vs_raw_rounds"] = rounds
            result["ratio_c16_to_raw"] = sorted(r["ratio"] for r in rounds)[1]
            # Contention-robust: CPU per image of the bare model / CPU per request of the server.
            result["cpu_ratio_raw_to_server"] = sorted(
                round(r["raw_cpu_ms_per_image"] / r["c16_server_cpu_ms_per_request"], 3) for r in rounds
            )[1]
            if not args.quick:
                done = sum(r["requests"] for key in ("dataset", "phone_4032x3024") for r in result[key])  # type: ignore[union-attr]
                remaining = max(0, args.rss_requests - done)
                if remaining:
                    run_load(url, data_files, 16, 0, tmp, total=remaining, client=client)
                result["requests_before_rss"] = max(done, args.rss_requests)
                result["rss_mb_after_requests"] = rss_mb(proc.pid)
                # A functional check, not a measurement: aiohttp fails loudly on a dropped connection
                # where wrk would only count it.
                bad = run_load(url, bad_uploads(tmp, jpegs[0]), 4, 0, tmp, total=200, client="aiohttp")
                result["bad_uploads"] = {"requests": bad["requests"], "statuses": bad["statuses"]}
                result["rss_mb_after_bad_uploads"] = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(markdown(result))
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results" / "serve.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
        tmp_out.replace(out)
    else:
        print(json.dumps(result))


def markdown(result: dict) -> str:
    raw = result["raw_onnxruntime"]
    lines = [
        f"raw ONNX Runtime on {raw['model_file']}: best {raw['best_images_per_s']} img/s "
        f"({raw['best_config']}), server layout {raw['server_images_per_s']} img/s; "
        f"ready in {result['time_to_ready_s']} s; c16/raw = {result['ratio_c16_to_raw']}, "
        f"raw/server CPU per image = {result['cpu_ratio_raw_to_server']}; "
        f"load generator: {result.get('client', 'aiohttp')}",
        "",
        "| raw layout | intra-op threads | callers | batch | img/s | CPU-ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in raw["configs"].items():
        lines.append(
            f"| {name} | {c['intra_op_threads']} | {c['callers']} | {c['batch']} | {c['images_per_s']} "
            f"| {c['cpu_ms_per_image']} |"
        )
    lines += [
        "",
        "| images | concurrency | req/s | p50 ms | p95 ms | p99 ms | server CPU-ms/req "
        "| load generator CPU-ms/req | non-200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("dataset", "phone_4032x3024"):
        for r in result.get(key, []):
            bad = sum(v for k, v in r["statuses"].items() if str(k) != "200")
            lines.append(
                f"| {key} | {r['concurrency']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} "
                f"| {r['p99_ms']} | {r.get('server_cpu_ms_per_request', '')} "
                f"| {r.get('loadgen_cpu_ms_per_request', '')} | {bad} |"
            )
    if result.get("draft_decode_parity"):
        d = result["draft_decode_parity"]
        lines.append("")
        lines.append(
            f"phone JPEG decode: {d['decode_ms_full']} ms full, {d['decode_ms_draft']} ms with draft "
            f"{d['draft_size']}; max |Δp| {d['max_abs_probability_diff']}, labels agree {d['labels_agree']}"
        )
    if "rss_mb_after_requests" in result:
        lines.append("")
        lines.append(
            f"RSS: {result['rss_mb_ready']} MB ready, {result['rss_mb_after_requests']} MB after "
            f"{result['requests_before_rss']} requests, {result['rss_mb_after_bad_uploads']} MB after "
            f"200 bad/huge uploads"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
