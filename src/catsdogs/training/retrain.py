"""``catsdogs retrain``: the scheduled retraining, new data in, a registered challenger out.

It drives the DVC pipeline of a checkout (dvc.yaml) rather than calling the stages itself, so a
retraining is exactly ``dvc repro``: re-export the staff's corrections (the ``feedback`` stage has no
dependencies, so only ``--force`` re-runs it), then re-run whatever that changed (ingest → train,
which registers the ``challenger`` → export → evaluate). The new data version can be pushed to a
named DVC remote and dvc.lock committed under the retraining's own git identity; the CronJob and the
GitHub Actions schedule push that commit and then run ``catsdogs promote``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from catsdogs import CatsdogsError
from catsdogs.registry.lineage import dvc_data_version
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

FEEDBACK_STAGE = "feedback"
LOCK_FILE = "dvc.lock"
#: git commands are local and quick; a hung one (a credential prompt, a lock) must not hang the job.
GIT_TIMEOUT_S = 120.0
#: Lines of a failed command's output kept for the one-line error.
TAIL_LINES = 40

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RetrainResult:
    """What one retraining did: data versions (DVC md5 of the ingested manifest), challengers before
    and after, where the data went and the commit made (``None``: nothing to commit, or not asked)."""

    project: Path
    data_version_before: str | None
    data_version: str | None
    challenger_before: int | None
    challenger: int | None
    feedback_refreshed: bool
    pulled_from: str | None = None
    pushed_to: str | None = None
    commit: str | None = None

    @property
    def data_changed(self) -> bool:
        return self.data_version != self.data_version_before

    @property
    def new_challenger(self) -> bool:
        return self.challenger is not None and self.challenger != self.challenger_before


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def dvc_command() -> list[str]:
    """How to run DVC: the ``dvc`` on PATH, else this interpreter's module (an unactivated venv)."""
    found = shutil.which("dvc")
    if found:
        return [found]
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    raise CatsdogsError("dvc is not installed: install the training extra (pip install -e '.[train]')")


def pipeline_stages(project: Path) -> list[str]:
    """The stage names of the project's dvc.yaml; refuses a folder that is no DVC project."""
    dvc_yaml = project / "dvc.yaml"
    if not (project / ".dvc").is_dir() or not dvc_yaml.is_file():
        raise CatsdogsError(
            f"{project} is not a DVC project (no .dvc/ or dvc.yaml): run retrain in a checkout"
        )
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CatsdogsError(f"cannot read {dvc_yaml}: {str(exc).splitlines()[0]}") from None
    return list(stages)


def run_streamed(
    command: list[str],
    *,
    cwd: Path,
    timeout_s: float,
    echo: Echo = _stderr,
    env: dict[str, str] | None = None,
) -> None:
    """Run a long command with its output passed line by line to ``echo`` as it comes (a retraining
    runs for hours: its progress must be visible), and fail with its last output line on one line."""
    shown = " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
    echo(f"$ {shown}")
    try:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as exc:
        raise CatsdogsError(f"cannot run `{shown}`: {exc.strerror or exc}") from None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            echo(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise CatsdogsError(f"`{shown}` did not finish within {timeout_s:.0f} s and was stopped") from None
    finally:
        reader.join(timeout=10)
    if code != 0:
        detail = next((line for line in reversed(tail) if line.strip()), "no output")
        raise CatsdogsError(f"`{shown}` failed (exit {code}): {detail.strip()}")


def git(project: Path, *args: str, settings: Settings | None = None) -> str:
    """One git command in ``project`` (as the retraining identity when ``settings`` is given)."""
    identity = []
    if settings is not None:
        identity = [
            "-c",
            f"user.name={settings.retrain_git_name}",
            "-c",
            f"user.email={settings.retrain_git_email}",
        ]
    command = ["git", *identity, *args]
    try:
        done = subprocess.run(
            command, cwd=project, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise CatsdogsError("git is not installed or not on PATH: retrain --commit needs it") from None
    except subprocess.TimeoutExpired:
        raise CatsdogsError(f"`git {args[0]}` did not finish within {GIT_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise CatsdogsError(f"`git {' '.join(args[:2])}` failed (exit {done.returncode}): {detail[-1]}")
    return done.stdout


def challenger_version(settings: Settings) -> int | None:
    """The version holding the ``challenger`` alias now; ``None`` when there is none yet."""
    from catsdogs.registry.model_source import registry_uri, resolve_version

    try:
        return resolve_version(f"models:/{settings.model_name}@challenger", settings)
    except CatsdogsError:  # no such model or alias yet
        return None
    except Exception as exc:  # MlflowException, OSError: an unreachable or broken registry
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CatsdogsError(f"cannot read the model registry {registry_uri(settings)}: {first}") from None


def data_version(project: Path, settings: Settings) -> str | None:
    """The data version dvc.lock records: the md5 of the ingested manifest (or data folder)."""
    data_dir = project / settings.data_dir  # an absolute data_dir stays as it is
    manifest = project / settings.manifest_path
    return dvc_data_version(data_dir, manifest, search_dirs=(project,))


def commit_message(result: RetrainResult, settings: Settings) -> str:
    """What the commit says: the new data version and the challenger the run registered."""
    data = f"data {(result.data_version or 'none')[:12]}"
    if not result.data_changed:
        data += " (unchanged)"
    if result.new_challenger:
        model = f"challenger {settings.model_name} v{result.challenger}"
    else:
        model = f"no new challenger (still v{result.challenger})" if result.challenger else "no challenger"
    body = (
        f"Data version (dvc.lock, ingest): {result.data_version_before} -> {result.data_version}\n"
        f"Challenger of {settings.model_name}: {result.challenger_before} -> {result.challenger}\n"
        f"Feedback re-exported: {'yes' if result.feedback_refreshed else 'no (no feedback stage)'}\n"
        f"Data pushed to DVC remote: {result.pushed_to or 'no'}\n"
    )
    return f"Retrain: {data}, {model}\n\n{body}"


def commit_lock(project: Path, settings: Settings, message: str) -> str | None:
    """Commit dvc.lock, and only it, as the retraining identity; ``None`` when it did not change."""
    if not git(project, "status", "--porcelain", "--", LOCK_FILE).strip():
        return None
    git(project, "add", "--", LOCK_FILE)
    # A path after `--` commits that path alone (git's --only), whatever else is staged.
    git(project, "commit", "-q", "-m", message, "--", LOCK_FILE, settings=settings)
    return git(project, "rev-parse", "HEAD").strip()


def retrain(
    settings: Settings,
    *,
    project: Path | None = None,
    pull: str | None = None,
    push: str | None = None,
    commit: bool = False,
    echo: Echo = _stderr,
) -> RetrainResult:
    """Re-export the feedback, re-run the DVC pipeline, and report what changed.

    Args:
        project: the DVC project (a checkout of this repository); default: the current folder.
        pull: a named DVC remote to restore the current data from first (a fresh checkout would
            otherwise rebuild every stage from the source archive).
        push: a named DVC remote to push the pipeline's data to afterwards.
        commit: commit dvc.lock (nothing else) as ``retrain_git_name`` <``retrain_git_email``>.
        echo: receives the commands' output line by line.
    """
    project = (project or Path.cwd()).resolve()
    stages = pipeline_stages(project)
    dvc = dvc_command()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    if commit:  # refused now rather than after hours of training
        git(project, "rev-parse", "--is-inside-work-tree")
    version_before = data_version(project, settings)
    challenger_before = challenger_version(settings)

    def run(*args: str) -> None:
        run_streamed([*dvc, *args], cwd=project, timeout_s=settings.retrain_timeout_s, echo=echo, env=env)

    if pull:
        run("pull", "--remote", pull, "--allow-missing")
    refreshed = FEEDBACK_STAGE in stages
    if refreshed:
        run("repro", "--single-item", "--force", FEEDBACK_STAGE)
    else:
        echo(f"the pipeline has no `{FEEDBACK_STAGE}` stage: retraining on the data it already has")
    run("repro")
    if push:
        run("push", "--remote", push)
    result = RetrainResult(
        project=project,
        data_version_before=version_before,
        data_version=data_version(project, settings),
        challenger_before=challenger_before,
        challenger=challenger_version(settings),
        feedback_refreshed=refreshed,
        pulled_from=pull,
        pushed_to=push,
    )
    if commit:
        sha = commit_lock(project, settings, commit_message(result, settings))
        result = dataclasses.replace(result, commit=sha)
    _logger.info("retrain done: %s", result)
    return result
