"""Soak test: `catsdogs serve` with production settings under a steady mix of good, bad and oversized
uploads for minutes, at a fixed fraction of its measured capacity.

What it checks (the hardening issue's bar): no 5xx at all, and memory that stays flat once warm
(a leak, an unbounded queue or a cache that never evicts shows up as RSS that keeps climbing).

  1. Start the service with API keys, a feedback secret, JSON access logs at INFO and drift sampling.
  2. Capacity: a closed-loop run at concurrency 16 with the same mix of uploads, for ``--probe-seconds``.
  3. Soak: an open-loop client sends ``--load`` × capacity requests/s for ``--minutes``, the mix drawn
     round-robin from a shuffled list (valid dataset JPEGs, phone-size JPEGs, broken files, a PNG
     decompression bomb, a 16-bit 7071² PNG, uploads over the size limit), and samples the server's
     RSS every ``--sample-seconds``.

Results: ``benchmarks/results/soak.json`` (or ``--out``): statuses by kind of upload, latency
percentiles of the valid ones, the RSS samples and ``rss_growth_after_warmup`` (last ÷ first sample
after the warm-up, and max ÷ first).

    python benchmarks/bench_soak.py --bundle BUNDLE [--minutes 10] [--load 0.8] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # the sibling script: server start, RSS, inputs

API_KEY = "soak-key"


def _png(
    width: int, height: int, bit_depth: int, colour_type: int, raw_row: bytes, rows: int | None = None
) -> bytes:
    """A PNG whose rows are all ``raw_row`` (compresses to almost nothing whatever its size); with
    ``rows``, only that many rows of data follow the header (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(b"\0" + raw_row) for _ in range(rows or height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` pixels (refused by its header, so little data follows)."""
    return _png(width, height, 8, 2, b"\0" * width * 3, rows=64)


def upload_mix(folder: Path, jpegs: list[bytes], limit: int) -> list[tuple[str, Path]]:
    """(kind, file) pairs in the proportions of the soak: mostly valid photos, some hostile files."""
    from PIL import Image

    phone = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).convert("RGB").resize((4032, 3024)).save(
        phone, format="JPEG", quality=85
    )
    hostile = {
        "bad_text": b"not an image" * 100,
        "bad_truncated": jpegs[1][: len(jpegs[1]) // 2],
        "bad_empty": b"",
        "bomb_png": _bomb_header(20000, 20000),
        "png16_7071": _png(7071, 7071, 16, 0, b"\0" * (7071 * 2)),
        "oversized": os.urandom(limit + 1024),
    }
    mix: list[tuple[str, Path]] = []
    for i, data in enumerate(jpegs):
        mix.append(("valid", _write(folder / f"valid_{i}.jpg", data)))
    mix += [("valid_phone", _write(folder / "phone.jpg", phone.getvalue()))] * 4
    for kind, data in hostile.items():
        mix += [(kind, _write(folder / f"{kind}.bin", data))] * 2
    random.Random(0).shuffle(mix)
    return mix


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the client (own process) ---------------------------------------------------------------------
async def _soak(spec: dict) -> dict:
    import aiohttp

    mix = [(kind, bench_serve.multipart(Path(path).read_bytes())) for kind, path in spec["mix"]]
    headers = {
        "Content-Type": f"multipart/form-data; boundary={bench_serve.BOUNDARY}",
        "X-API-Key": API_KEY,
    }
    statuses: dict[str, dict[str, int]] = {}
    latencies: list[float] = []
    rate, seconds, max_outstanding = spec["rate"], spec["seconds"], spec["max_outstanding"]
    outstanding, skipped = 0, 0

    async def one(session: aiohttp.ClientSession, kind: str, body: bytes) -> None:
        nonlocal outstanding
        t0 = time.perf_counter()
        try:
            async with session.post(f"{spec['url']}/predict", data=body, headers=headers) as response:
                await response.read()
                status = str(response.status)
        except aiohttp.ClientError as exc:  # a dropped connection counts as a failure, by name
            status = f"client_error:{type(exc).__name__}"
        finally:
            outstanding -= 1
        by_kind = statuses.setdefault(kind, {})
        by_kind[status] = by_kind.get(status, 0) + 1
        if kind.startswith("valid") and status == "200":
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=max_outstanding)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks, started, i = [], time.perf_counter(), 0
        if rate is None:  # closed loop: max_outstanding clients back to back (the capacity probe)

            async def client(k: int) -> None:
                nonlocal outstanding
                j = k
                while time.perf_counter() - started < seconds:
                    outstanding += 1
                    await one(session, *mix[j % len(mix)])
                    j += max_outstanding

            await asyncio.gather(*(client(k) for k in range(max_outstanding)))
            i = sum(sum(by.values()) for by in statuses.values())
        while rate is not None and (now := time.perf_counter() - started) < seconds:
            due = int(now * rate) + 1
            while i < due:
                kind, body = mix[i % len(mix)]
                i += 1
                if outstanding >= max_outstanding:  # the server fell behind: say so, do not pile up
                    skipped += 1
                    continue
                outstanding += 1
                tasks.append(asyncio.ensure_future(one(session, kind, body)))
            await asyncio.sleep(max(0.0, (i / rate) - (time.perf_counter() - started)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies or [0.0])
    return {
        "sent": i - skipped,
        "skipped_client_backlog": skipped,
        "seconds": round(elapsed, 1),
        "achieved_rps": round((i - skipped) / elapsed, 2),
        "statuses_by_kind": statuses,
        "valid_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "valid_p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def run_client(spec: dict, tmp: Path) -> dict:
    path = tmp / "soak-spec.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, __file__, "--client-spec", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def sample_rss(pid: int, every_s: float, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    while not stop.wait(every_s):
        samples.append((round(time.perf_counter() - started, 1), bench_serve.rss_mb(pid)))


def five_xx(statuses: dict[str, dict[str, int]]) -> int:
    return sum(
        n for by in statuses.values() for code, n in by.items() if not code.isdigit() or code.startswith("5")
    )


def capacity(url: str, mix: list[tuple[str, Path]], seconds: float, tmp: Path) -> dict:
    """Closed loop at concurrency 16 with the soak's mix: the rate the server sustains."""
    probe = run_client({"url": url, "mix": [(k, str(p)) for k, p in mix], "rate": None,
                        "seconds": seconds, "max_outstanding": 16}, tmp)  # fmt: skip
    return {**probe, "capacity_rps": probe["achieved_rps"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--client-spec", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, required="--client-spec" not in sys.argv)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--probe-seconds", type=float, default=30.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    if args.client_spec:
        print(json.dumps(asyncio.run(_soak(json.loads(Path(args.client_spec).read_text())))))
        return
    env = {
        "CATSDOGS_API_KEYS": API_KEY,
        "CATSDOGS_FEEDBACK_SECRET": "soak-feedback-secret",
        "CATSDOGS_LOG_LEVEL": "INFO",
        "CATSDOGS_STORE_UPLOADS": "false",
        # The per-key rate limit stays on (its cost is measured) but above what the one client sends.
        "CATSDOGS_RATE_LIMIT_PER_MINUTE": "100000000",
    }
    with tempfile.TemporaryDirectory(prefix="catsdogs-soak-") as tmp_name:
        tmp = Path(tmp_name)
        settings = bench_serve.server_settings(env, tmp)
        mix = upload_mix(tmp, bench_serve.dataset_jpegs(40), settings.max_upload_bytes)
        proc, url, _ = bench_serve.start_server(args.bundle, env, tmp)
        try:
            probe = capacity(url, mix, args.probe_seconds, tmp)
            rate = round(args.load * probe["capacity_rps"], 2)
            samples: list[tuple[float, float]] = [(0.0, bench_serve.rss_mb(proc.pid))]
            stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(proc.pid, args.sample_seconds, stop, samples))
            sampler.start()
            soak = run_client({"url": url, "mix": [(k, str(p)) for k, p in mix], "rate": rate,
                               "seconds": args.minutes * 60, "max_outstanding": 64}, tmp)  # fmt: skip
            stop.set()
            sampler.join()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    warm = [rss for t, rss in samples if t >= args.warmup_fraction * args.minutes * 60]
    result = {
        "started_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "bundle": str(args.bundle),
        "server_env": {k: ("<set>" if "KEY" in k or "SECRET" in k else v) for k, v in env.items()},
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "capacity_probe": probe,
        "load_fraction": args.load,
        "target_rps": rate,
        "soak": soak,
        "five_xx": five_xx(soak["statuses_by_kind"]) + five_xx(probe["statuses_by_kind"]),
        "rss_mb_samples": samples,
        "rss_growth_after_warmup": {
            "last_over_first": round(warm[-1] / warm[0], 3),
            "max_over_first": round(max(warm) / warm[0], 3),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("target_rps", "five_xx", "rss_growth_after_warmup")}, indent=2))


if __name__ == "__main__":
    main()
