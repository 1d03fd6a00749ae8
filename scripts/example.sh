#!/usr/bin/env bash
# THE example command: set up what the example needs (the virtualenv, and gcc and
# libc6-dev for its genrule), then build the example image //images:web offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gcc libc6-dev
venv="$(realpath -m "${DTBUILD_VENV:-.venv}")"
cd examples/workspace
"$venv/bin/dtbuild" //images:web
