#!/usr/bin/env bash
# A new user's first hour, on this machine: clone the current commit into an empty folder (no
# ../shared beside it), serve the dataset archive on a loopback port as the stand-in for the public
# download, then run the README's set-up and test commands, `make setup` and `make test`, timing each.
# The summary log records the commit, the commands, their wall times and pytest's summary line.
#
# Usage: scripts/fresh-clone-check.sh [ARCHIVE]   (default /work/shared/datasets/dogs-vs-cats/train.zip)
# Env:   OUT (default /tmp/catsdogs-fresh-clone-<time>): summary.log, setup.out, test.out and the
#        dataset server's access log go there
#        PYTEST_ADDOPTS e.g. "-k deploy" for a subset; CI (default true: a missing tool fails, as in CI)
#        KEEP=1 keeps the clone, its .venv and the downloaded archive (deleted otherwise)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
archive="${1:-/work/shared/datasets/dogs-vs-cats/train.zip}"
OUT="${OUT:-/tmp/catsdogs-fresh-clone-$(date +%Y%m%d-%H%M%S)}"
export CI="${CI:-true}"
# shellcheck source=scripts/lib/dataset-server.sh
source "$here/scripts/lib/dataset-server.sh"

mkdir -p "$OUT"
work="$(mktemp -d /tmp/catsdogs-fresh.XXXXXX)"
cleanup() {
  stop_dataset_server
  [[ "${KEEP:-0}" == 1 ]] || rm -rf "$work"
}
trap cleanup EXIT
note() { printf '%s\n' "$*" | tee -a "$OUT/summary.log"; }

commit="$(git -C "$here" rev-parse HEAD)"
[[ -z "$(git -C "$here" status --porcelain --untracked-files=no)" ]] ||
  note "warning: uncommitted changes in $here are not part of the check (it clones $commit)"
git clone -q "$here" "$work/catsdogs"
git -C "$work/catsdogs" checkout -q --detach "$commit"
[[ ! -e "$work/shared" ]] || {
  echo "$work/shared exists" >&2
  exit 1
}
start_dataset_server "$archive" "$OUT/dataset-server.log"
export CATSDOGS_TEST_CACHE="$work/test-cache" # an empty cache: the tests download the archive themselves

note "fresh-clone check of $commit in $work/catsdogs (no ../shared), $(date -u +%FT%TZ), $(nproc) cores"
note "dataset: $archive served as CATSDOGS_DATA_SOURCE=$CATSDOGS_DATA_SOURCE"
note "         CATSDOGS_DATA_SHA256=$CATSDOGS_DATA_SHA256; CI=$CI; PYTEST_ADDOPTS=${PYTEST_ADDOPTS:-}"

# Run one command in the clone, its output into $OUT/<name>.out; note its exit code and wall time.
timed() {
  local name=$1 started=$SECONDS rc=0
  shift
  (cd "$work/catsdogs" && "$@") >"$OUT/$name.out" 2>&1 || rc=$?
  note "$name: \`$*\` exit $rc in $((SECONDS - started)) s"
  return "$rc"
}

status=0
timed setup make setup || status=$?
note "  $(tail -n 1 "$OUT/setup.out")"
if ((status == 0)); then
  timed test make test || status=$?
  note "  pytest: $(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$OUT/test.out" | tail -n 1 || echo 'no summary line')"
fi
note "result: $( ((status == 0)) && echo PASSED || echo "FAILED (exit $status)"); logs in $OUT"
exit "$status"
