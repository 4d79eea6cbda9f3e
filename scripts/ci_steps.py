#!/usr/bin/env python3
"""Turn a CI pipeline's shell steps into a script that runs anywhere (scripts/ci-in-container.sh).

GitHub Actions: one job's ``run:`` steps from a workflow, in order, with the workflow's and job's
``env:``; each ``uses:`` step gets a named stand-in (or the job is refused). Jenkins: the ``sh``
steps of the chosen stages of a Jenkinsfile, with its ``environment {}`` values and build parameters.
Repository variables, secrets and build parameters come from this process's environment, under
the same name. Writes ``run.sh`` plus one file per step into the output folder and prints the plan.

Usage: scripts/ci_steps.py github .github/workflows/ci.yml --job test --out DIR [--through 'make setup']
       scripts/ci_steps.py jenkins Jenkinsfile --stages Setup,Test --out DIR [--through 'make setup']
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: What stands in for each action outside GitHub (the container is the runner).
STAND_INS = {
    "actions/checkout": "the repository copy (git clone of HEAD) the steps run in",
    "actions/setup-python": "the image's python3 (Debian's 3.11)",
    "actions/cache": "nothing: the test data is downloaded again on every run",
    "actions/upload-artifact": "nothing: the files stay in the repository copy",
}
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
CONTEXT_NAME = re.compile(r"(env|vars|secrets)\.([A-Za-z_]\w*)")
STAGE = re.compile(r"^\s*stage\('([^']+)'\)", re.MULTILINE)
SH_STEP = re.compile(r"\bsh\s+(?:'''(.*?)'''|'([^'\n]*)')", re.DOTALL)
ASSIGNMENT = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*=\s*'([^']*)'", re.MULTILINE)
PARAMETER = re.compile(r"\bstring\(name:\s*'([A-Za-z_]\w*)'")


@dataclass(frozen=True)
class Step:
    """One step: a shell script to run (``interpreter``: how the CI runs it) or a stand-in to list."""

    title: str
    script: str | None = None
    interpreter: tuple[str, ...] = ("bash", "-eo", "pipefail")
    env: dict[str, str] = field(default_factory=dict)
    stand_in: str | None = None


def resolve(text: str, env: Mapping[str, str], outside: Mapping[str, str]) -> str:
    """Replace ``${{ env.X }}`` from the workflow's env and ``${{ vars.X }}``/``${{ secrets.X }}`` from
    ``outside``; any other expression cannot be reproduced here, so it is an error."""

    def one(match: re.Match[str]) -> str:
        name = CONTEXT_NAME.fullmatch(match.group(1))
        if name is None:
            raise ValueError(f"cannot reproduce the expression {match.group(0)!r} outside GitHub Actions")
        source = env if name.group(1) == "env" else outside
        return source.get(name.group(2), "")

    return EXPRESSION.sub(one, text)


def github_steps(workflow: Path, job: str, outside: Mapping[str, str]) -> tuple[dict[str, str], list[Step]]:
    """The job's environment and steps, expressions resolved."""
    document = yaml.safe_load(workflow.read_text())
    spec = document["jobs"][job]
    env: dict[str, str] = {}
    for scope in (document.get("env") or {}, spec.get("env") or {}):
        env.update({key: resolve(str(value), env, outside) for key, value in scope.items()})
    steps = []
    for raw in spec["steps"]:
        if "uses" in raw:
            action = raw["uses"].split("@", 1)[0]
            if action not in STAND_INS:
                raise ValueError(f"job {job!r} uses {raw['uses']}, which has no stand-in here")
            steps.append(Step(title=f"uses: {raw['uses']}", stand_in=STAND_INS[action]))
            continue
        step_env = {key: resolve(str(value), env, outside) for key, value in (raw.get("env") or {}).items()}
        script = resolve(raw["run"], {**env, **step_env}, outside)
        steps.append(Step(title=raw.get("name", script.splitlines()[0]), script=script, env=step_env))
    return env, steps


def _block(text: str, keyword: str) -> str:
    """The body of the first ``keyword { ... }`` block in ``text`` (braces balanced)."""
    start = re.search(rf"\b{keyword}\s*\{{", text)
    if start is None:
        return ""
    depth, index = 1, start.end()
    while depth and index < len(text):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        index += 1
    return text[start.end() : index - 1]


def jenkins_steps(
    jenkinsfile: Path, stages: list[str], outside: Mapping[str, str]
) -> tuple[dict[str, str], list[Step]]:
    """The pipeline's environment and build parameters, and the ``sh`` steps of ``stages``; every other
    stage is listed as not run."""
    text = jenkinsfile.read_text()
    body = text[: STAGE.search(text).start()]  # the pipeline-level blocks come before the first stage
    env = {name: outside.get(name, "") for name in PARAMETER.findall(_block(body, "parameters"))}
    env.update(ASSIGNMENT.findall(_block(body, "environment")))
    marks = list(STAGE.finditer(text))
    steps = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        name, chunk = mark.group(1), text[mark.end() : following.start() if following else len(text)]
        if name not in stages:
            steps.append(Step(title=f"stage {name}", stand_in="not run here (see docs/deployment.md)"))
            continue
        stage_env = dict(ASSIGNMENT.findall(_block(chunk, "environment")))
        for triple, single in SH_STEP.findall(chunk):
            script = (triple or single).strip()
            jenkins_sh = ("sh", "-xe")
            steps.append(Step(f"stage {name}: sh", script=script, interpreter=jenkins_sh, env=stage_env))
    missing = set(stages) - {m.group(1) for m in marks}
    if missing:
        raise ValueError(f"no stage named {sorted(missing)} in {jenkinsfile}")
    return env, steps


def write_runner(out: Path, env: Mapping[str, str], steps: list[Step], *, through: str | None) -> list[str]:
    """Write ``out/run.sh`` (runs the steps in order, timing each, stopping at the first failure) and
    ``out/step-NN.sh``; returns the plan, one line a step."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash", "# Generated by scripts/ci_steps.py.", "set -uo pipefail"]
    lines += ["export CI=true"]  # as both CIs set it
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    # A subset run (EXTRA_PYTEST_ADDOPTS="-k promtool"): pytest options on top of the pipeline's.
    lines += ['export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} ${EXTRA_PYTEST_ADDOPTS:-}"']
    lines += [
        'step() { local title=$1 started=$SECONDS; shift; echo "::: $title"',
        '  if "$@"; then echo "::: passed in $((SECONDS - started)) s: $title"',
        '  else local rc=$?; echo "::: FAILED (exit $rc) after $((SECONDS - started)) s: $title"',
        "  exit $rc; fi; }",
    ]
    plan: list[str] = []
    for number, step in enumerate(steps, 1):
        if step.script is None:
            plan.append(f"{number:2d}. {step.title} -> stand-in: {step.stand_in}")
            lines.append(f"echo {shlex.quote(f'::: {step.title} -> stand-in: {step.stand_in}')}")
            continue
        path = out / f"step-{number:02d}.sh"
        path.write_text(step.script + "\n")
        # A step's own pytest options still get the subset's.
        extra = {"PYTEST_ADDOPTS": '" ${EXTRA_PYTEST_ADDOPTS:-}"'}
        assignments = [f"{key}={shlex.quote(value)}{extra.get(key, '')}" for key, value in step.env.items()]
        command = ["env", *assignments, *step.interpreter, f'"$(dirname "$0")/{path.name}"']
        lines.append(f"step {shlex.quote(step.title)} {' '.join(command)}")
        plan.append(f"{number:2d}. {step.title}: run")
        if through is not None and through in step.script:
            plan.append(f"    (stops here: --through {through!r})")
            break
    lines.append('echo "::: all steps passed"')
    runner = out / "run.sh"
    runner.write_text("\n".join(lines) + "\n")
    runner.chmod(0o755)
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["github", "jenkins"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--job", default="test", help="GitHub Actions job (default: test)")
    parser.add_argument("--stages", default="Setup,Test", help="Jenkins stages to run (default: Setup,Test)")
    parser.add_argument("--through", help="stop after the first step whose script contains this text")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    outside = dict(os.environ)
    if args.kind == "github":
        env, steps = github_steps(args.file, args.job, outside)
    else:
        env, steps = jenkins_steps(args.file, args.stages.split(","), outside)
    plan = write_runner(args.out, env, steps, through=args.through)
    sys.stdout.write("\n".join(plan) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
