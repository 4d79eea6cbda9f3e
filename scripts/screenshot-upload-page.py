#!/usr/bin/env python3
"""Screenshot of the upload page answering a photo, for the README (docs/images/upload-page.png).

Serves a model with `catsdogs serve` on loopback, opens the page in Debian's Chromium (Playwright,
no browser download), uploads scikit-image's bundled `chelsea` photo (a cat; no dataset image is
ever committed) and saves the answered page.

Usage (the demo's model, trained by `catsdogs quickstart --no-serve`):
    scripts/screenshot-upload-page.py [--model-uri demo/runs/quickstart-head/bundle] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from skimage import data

from catsdogs.quickstart import DEMO_RUN_NAME

REPO = Path(__file__).resolve().parents[1]
_logger = logging.getLogger("screenshot")


def chelsea_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"catsdogs serve exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} was not ready after {timeout_s:.0f} s")


def screenshot(url: str, out: Path, *, chromium: str) -> str:
    """Upload chelsea on the page at ``url``, save the answered page to ``out``; return the answer."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 760, "height": 600}, device_scale_factor=1)
        page.goto(f"{url}/")
        page.set_input_files(
            "#file", files=[{"name": "chelsea.jpg", "mimeType": "image/jpeg", "buffer": chelsea_jpeg()}]
        )
        expect(page.locator("#answer")).to_contain_text("%", timeout=30_000)
        page.wait_for_function("document.getElementById('preview').complete")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        answer = page.locator("#answer").inner_text()
        browser.close()
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-uri", default=f"demo/runs/{DEMO_RUN_NAME}/bundle")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "upload-page.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="screenshot-") as cache:
        env = {**os.environ, "CATSDOGS_CACHE_DIR": cache, "CATSDOGS_RELOAD_INTERVAL_S": "0"}
        serve = ["-m", "catsdogs", "serve", "--model-uri", args.model_uri, "--host", "127.0.0.1"]
        proc = subprocess.Popen(
            [sys.executable, *serve, "--port", str(port)], env=env, stderr=subprocess.DEVNULL
        )
        try:
            _wait_ready(url, proc)
            answer = screenshot(url, args.out, chromium=args.chromium)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    _logger.info("%s: the page answered %r", args.out, answer)


if __name__ == "__main__":
    main()
