# shellcheck shell=bash
# Serve a dataset archive on a loopback port, standing in for the public download on a machine that
# cannot reach it (scripts/fresh-clone-check.sh, scripts/ci-in-container.sh). Source this file, then:
#   start_dataset_server ARCHIVE [LOG]   exports CATSDOGS_DATA_SOURCE (http://127.0.0.1:PORT/NAME) and
#                                        CATSDOGS_DATA_SHA256 (computed here), sets DATASET_SERVER_PID;
#                                        the server's access log goes to LOG (default /dev/null)
#   stop_dataset_server                  stops that server, by its PID

start_dataset_server() {
  local archive=$1 log=${2:-/dev/null} name port
  [[ -f "$archive" ]] || {
    echo "no dataset archive at $archive" >&2
    return 1
  }
  name="$(basename "$archive")"
  DATASET_SERVER_DIR="$(mktemp -d)"
  ln -s "$(realpath "$archive")" "$DATASET_SERVER_DIR/$name"
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  python3 -m http.server --bind 127.0.0.1 --directory "$DATASET_SERVER_DIR" "$port" >>"$log" 2>&1 &
  DATASET_SERVER_PID=$!
  CATSDOGS_DATA_SHA256="$(sha256sum "$archive" | cut -d' ' -f1)"
  export CATSDOGS_DATA_SOURCE="http://127.0.0.1:$port/$name" CATSDOGS_DATA_SHA256
  python3 - "$CATSDOGS_DATA_SOURCE" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"the dataset server at {sys.argv[1]} did not answer")
PY
}

stop_dataset_server() {
  if [[ -n "${DATASET_SERVER_PID:-}" ]]; then
    kill "$DATASET_SERVER_PID" 2>/dev/null || true
    wait "$DATASET_SERVER_PID" 2>/dev/null || true
    rm -rf "$DATASET_SERVER_DIR"
    DATASET_SERVER_PID=
  fi
}
