"""The architecture as a test: one-way arrows between the lifecycle stages, no import cycles, and a
serving path that runs with neither torch nor MLflow installed.

The import graph is read from the source (``ast``), module-level and function-level imports alike:
an import inside a function is still an arrow, it only runs later.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import catsdogs
from fakes import build_bundle
from support import dataset_photos

PACKAGE = Path(catsdogs.__file__).resolve().parent

#: Torch-free modules every stage may import; they import no stage.
SHARED = frozenset(
    {
        "catsdogs",  # the package's __init__: __version__ and CatsdogsError
        "catsdogs.settings",
        "catsdogs.access",
        "catsdogs.preprocessing",
        "catsdogs.bundle",
        "catsdogs.runtime",
        "catsdogs.metrics",
        "catsdogs.drift",
        "catsdogs.files",
        "catsdogs.image_memory",
        "catsdogs.malloc",
        "catsdogs.ood",
        "catsdogs.explain",
    }
)

#: Which stages (or single modules) each stage may import, besides itself and the shared modules.
#: Arrows point one way: data → training → registry → serve, monitoring beside serve; the CLI and
#: ``python -m catsdogs`` sit on top, and nothing imports them.
ALLOWED: dict[str, frozenset[str]] = {
    "shared": frozenset(),
    # The feedback store (labels, kept images): written by serve, read by data (ingest --feedback)
    # and monitoring (the rollback guard); sqlalchemy and alembic, no stage of its own to import.
    "feedback": frozenset(),
    "data": frozenset({"feedback"}),
    "training": frozenset(
        {
            "data",
            "catsdogs.registry.lineage",  # the bundle records the data and code versions it came from
            "catsdogs.registry.model_source",  # `evaluate --model-uri models:/…` resolves through it
        }
    ),
    "registry": frozenset({"feedback"}),  # promote --require-shadow reads the shadow record
    # the one model-URI resolver (mlflow-skinny only), and the feedback store
    "serve": frozenset({"catsdogs.registry.model_source", "feedback"}),
    # the rollback guard reads live accuracy from the feedback store and moves champion back
    "monitoring": frozenset({"data", "feedback", "registry"}),
    # `catsdogs predict-batch`: the data stage's safe listing, the model resolved as serving does
    "batch": frozenset({"data", "catsdogs.registry.model_source"}),
    "deploy": frozenset(),
    # `catsdogs quickstart`: the whole lifecycle on a sample, one step of each stage in order
    "quickstart": frozenset({"data", "training", "registry", "serve"}),
    "cli": frozenset(
        {"data", "feedback", "training", "registry", "serve", "monitoring", "batch", "deploy", "quickstart"}
    ),
    "__main__": frozenset({"cli"}),
}

#: Single modules with one arrow more than their stage.
EXTRA: dict[str, frozenset[str]] = {
    # The end of a training run: log it to MLflow and register the bundle as the challenger.
    "catsdogs.training.workflow": frozenset({"catsdogs.registry.tracking"}),
}


def package_modules() -> dict[str, Path]:
    """Every module of the package under test: dotted name → file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module ``name`` names, or the closest enclosing one (``pkg.module.attr`` → ``pkg.module``)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, the module mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {_resolve(name, modules) for name in names if name.split(".")[0] == "catsdogs"}
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def stage(module: str) -> str:
    return "shared" if module in SHARED else module.split(".")[1]


def _allowed(source: str, target: str) -> bool:
    allowed = ALLOWED[stage(source)] | EXTRA.get(source, frozenset()) | {stage(source), "shared"}
    if stage(source) == "shared":
        allowed = frozenset({"shared"})
    return stage(target) in allowed or any(target == a or target.startswith(a + ".") for a in allowed)


def test_every_module_belongs_to_a_stage_of_the_table() -> None:
    unknown = sorted(m for m in package_modules() if stage(m) not in ALLOWED)
    assert not unknown, f"modules in no stage of ALLOWED (add the stage to the table): {unknown}"


def test_imports_point_one_way_between_stages() -> None:
    wrong = [
        f"{source} ({stage(source)}) imports {target} ({stage(target)}); "
        f"{stage(source)} may import: {', '.join(sorted(ALLOWED[stage(source)] | {'shared'}))}"
        for source, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if not _allowed(source, target)
    ]
    assert not wrong, "arrows against the architecture (docs/architecture.md):\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if found := visit(target):
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if found := visit(module):
            return found
    return None


def test_no_two_modules_import_each_other_even_through_others() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_and_the_arrow_table_catch_what_they_must() -> None:
    """The checks above would fail on a cycle and on a backward arrow (so their passing means something)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert not _allowed("catsdogs.data.ingest", "catsdogs.training.train")
    assert not _allowed("catsdogs.serve.app", "catsdogs.registry.tracking")
    assert not _allowed("catsdogs.preprocessing", "catsdogs.data.sources")
    assert not _allowed("catsdogs.training.train", "catsdogs.cli")
    assert _allowed("catsdogs.serve.model_store", "catsdogs.registry.model_source")


# --- the serving path without torch and MLflow ----------------------------------------------------

#: Made unimportable in the subprocess: the serving install has neither.
UNIMPORTABLE = ("torch", "torchvision", "mlflow")
#: Must not be imported by serving (each is heavy, and none is in the serving install's needs).
NOT_LOADED = ("torch", "mlflow", "pandas", "sklearn", "flask", "pyarrow")
TRAINING_SIDE = ("catsdogs.training", "catsdogs.registry.tracking", "catsdogs.registry.promotion")

SERVING_WITHOUT_TORCH = """
import sys

class Unimportable:
    '''Refuses the named packages, as if they were not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {unimportable!r}:
            raise ImportError(f"{{name}} is unimportable in this test")
        return None

sys.meta_path.insert(0, Unimportable())

import time
import catsdogs.preprocessing, catsdogs.bundle, catsdogs.runtime
import catsdogs.serve.app
from catsdogs.serve import server, smoke
from catsdogs.registry import model_source
import catsdogs.cli
from fastapi.testclient import TestClient
from catsdogs.settings import Settings

app = catsdogs.serve.app.create_app(Settings(model_uri={bundle!r}, cache_dir={cache!r}))
with TestClient(app) as client:
    for _ in range(200):
        if client.get("/ready").status_code == 200:
            break
        time.sleep(0.05)
    answer = client.post("/predict", files={{"file": ("cat.jpg", open({image!r}, "rb").read())}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] in ("cat", "dog", "unknown"), answer.json()
    explained = client.post("/explain", files={{"file": ("cat.jpg", open({image!r}, "rb").read())}})
    assert explained.status_code == {explain_status}, explained.text
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None)
heavy = [m for m in loaded if m.partition(".")[0] in {not_loaded!r}]
assert not heavy, f"the serving path imported {{heavy[:10]}}"
training = [m for m in loaded if m.startswith({training!r})]
assert not training, f"the serving path imported training-side modules {{training}}"
print("OK")
"""


def _serve_without_torch(tmp_path: Path, dataset_zip: Path, bundle: Path, *, explain_status: int) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(dataset_photos(dataset_zip, "cat", 1)[0])
    code = SERVING_WITHOUT_TORCH.format(
        unimportable=UNIMPORTABLE, not_loaded=NOT_LOADED, training=TRAINING_SIDE,
        bundle=str(bundle), cache=str(tmp_path / "cache"), image=str(image), explain_status=explain_status,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(PACKAGE.parent),
        "CATSDOGS_PARAMS_FILE": str(tmp_path / "none.yaml"),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


def test_serving_runs_with_torch_and_mlflow_unimportable(tmp_path: Path, dataset_zip: Path) -> None:
    _serve_without_torch(tmp_path, dataset_zip, build_bundle(tmp_path / "bundle"), explain_status=409)


def test_unknown_answers_and_explain_run_with_torch_and_mlflow_unimportable(
    tmp_path: Path, dataset_zip: Path, trust_run
) -> None:
    """A trained bundle with its detector and activation maps: /predict judges, /explain draws."""
    result, _ = trust_run
    _serve_without_torch(tmp_path, dataset_zip, result.bundle_dir, explain_status=200)


@pytest.mark.parametrize("blocked", UNIMPORTABLE)
def test_the_subprocess_really_cannot_import_what_it_blocks(blocked: str) -> None:
    """Guards the guard: the finder makes the package unimportable (so the test above proves something)."""
    finder = SERVING_WITHOUT_TORCH.split("import time")[0].format(unimportable=UNIMPORTABLE)
    code = finder + f"\ntry:\n    import {blocked}\nexcept ImportError:\n    print('refused')\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused", done.stderr[-2000:]
