#!/usr/bin/env bash
# Run a CI pipeline's own shell steps in a clean container standing in for a hosted runner: the
# GitHub Actions job's `run:` steps (.github/workflows/ci.yml, job `test`) or the Jenkinsfile's `sh`
# steps (stages Setup and Test), in order, as scripts/ci_steps.py extracts them; it names the stand-in
# for every `uses:` step (checkout: a git clone of HEAD; setup-python: the image's Python 3.11; cache:
# nothing). The runner stand-in:
#   image    python:3.11-slim (scripts/build-base-image.sh makes a stand-in where no registry is
#            reachable), plus make and git, which every hosted runner has; runs as root (sudo's role)
#   network  the host's, trusting the CAs the host adds: Debian, PyPI and npm, and the dataset archive
#            served on loopback as the repository secrets CATSDOGS_DATA_SOURCE / CATSDOGS_DATA_SHA256
#            (scripts/lib/dataset-server.sh)
#   torch    the CPU wheel on this machine's disk as a pip --find-links source (PyPI's torch is the
#            CUDA build, and PyTorch's own index is out of reach here)
#   podman   privileged, with its own storage, so the tests can build and run images inside (NESTED=0:
#            an ordinary container, where `make setup` and the image tests cannot use podman)
#
# Usage: scripts/ci-in-container.sh github|jenkins [ARCHIVE]
# Env:   THROUGH='make setup' stops after that step; EXTRA_PYTEST_ADDOPTS (e.g. "-k promtool") is added
#        to the pipeline's pytest options; OUT (default /tmp/catsdogs-ci-<kind>-<time>) gets run.log;
#        TORCH_WHEELS (default /opt/wheels); KEEP=1 keeps the work folder (clone, podman storage).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
kind="${1:?usage: scripts/ci-in-container.sh github|jenkins [ARCHIVE]}"
archive="${2:-/work/shared/datasets/dogs-vs-cats/train.zip}"
BASE_TAG="${BASE_TAG:-docker.io/library/python:3.11-slim}"
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
OUT="${OUT:-/tmp/catsdogs-ci-$kind-$(date +%Y%m%d-%H%M%S)}"
LOCAL_CAS=/usr/local/share/ca-certificates # CAs this host adds, e.g. a TLS-intercepting proxy's
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/deploy/podman/containers.conf}"
# shellcheck source=scripts/lib/dataset-server.sh
source "$here/scripts/lib/dataset-server.sh"

case "$kind" in
  github) steps_args=(github "$here/.github/workflows/ci.yml" --job test) ;;
  jenkins) steps_args=(jenkins "$here/Jenkinsfile" --stages Setup,Test) ;;
  *)
    echo "unknown pipeline '$kind' (github or jenkins)" >&2
    exit 2
    ;;
esac
compgen -G "$TORCH_WHEELS/torch-*+cpu-*.whl" >/dev/null || {
  echo "no CPU torch wheel in $TORCH_WHEELS (set TORCH_WHEELS)" >&2
  exit 1
}

mkdir -p "$OUT"
work="$(mktemp -d /tmp/catsdogs-ci.XXXXXX)"
cleanup() {
  stop_dataset_server
  [[ "${KEEP:-0}" == 1 ]] || rm -rf "$work"
}
trap cleanup EXIT

"$here/scripts/build-base-image.sh" >&2 # the image, unless it exists
git clone -q "$here" "$work/repo"       # actions/checkout, or Jenkins' checkout scm
git -C "$work/repo" checkout -q --detach "$(git -C "$here" rev-parse HEAD)"
start_dataset_server "$archive" "$OUT/dataset-server.log"
python=("$here/.venv/bin/python")
[[ -x "${python[0]}" ]] || python=(python3) # needs PyYAML
"${python[@]}" "$here/scripts/ci_steps.py" "${steps_args[@]}" --out "$work/steps" ${THROUGH:+--through "$THROUGH"} |
  tee "$OUT/plan.txt"

run_args=(--rm --network=host -v "$work/repo:/workspace" -w /workspace -v "$work/steps:/ci-steps:ro"
  -v "$TORCH_WHEELS:/wheels:ro" -e PIP_FIND_LINKS=/wheels -e EXTRA_PYTEST_ADDOPTS)
runner='apt-get update -qq && apt-get install -y -qq --no-install-recommends make git >/dev/null'
if compgen -G "$LOCAL_CAS/*.crt" >/dev/null; then # the container trusts them too, as the host does
  bundle=/etc/ssl/certs/ca-certificates.crt
  run_args+=(-v "$LOCAL_CAS:/host-cas:ro" -e "PIP_CERT=$bundle" -e "NODE_EXTRA_CA_CERTS=$bundle")
  runner="cp /host-cas/*.crt $LOCAL_CAS/ && update-ca-certificates >/dev/null && $runner"
fi
if [[ "${NESTED:-1}" == 1 ]]; then
  mkdir -p "$work/containers"
  run_args+=(--privileged --device /dev/fuse -v "$work/containers:/var/lib/containers")
fi
runner="$runner && /ci-steps/run.sh"
started=$SECONDS
rc=0
podman run "${run_args[@]}" "$BASE_TAG" bash -c "$runner" 2>&1 | tee "$OUT/run.log" || rc=$?
echo "ci-in-container $kind: exit $rc in $((SECONDS - started)) s; log in $OUT/run.log" | tee -a "$OUT/plan.txt"
exit "$rc"
