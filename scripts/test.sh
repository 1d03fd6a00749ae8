#!/usr/bin/env bash
# THE test command: set up (scripts/setup.sh), then ruff, mypy and the whole pytest suite.
# Extra arguments go to pytest:  bash scripts/test.sh -k labels -x
# Fails when ruff, mypy or pytest fails, and when pytest collected no test (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${DTBUILD_VENV:-.venv}"

ruff_status=0
"$venv/bin/ruff" check . || ruff_status=$?

# mypy on what [tool.mypy] in pyproject.toml names (engine/, rules/, the plugin API). It
# reads the sources through build/mypy-src/dtbuild/, symlinks in package-dir's shape,
# because it cannot follow the editable install's import hook.
mkdir -p build/mypy-src/dtbuild
for root in engine rules plugins; do ln -sfn "../../../$root" "build/mypy-src/dtbuild/$root"; done
mypy_status=0
"$venv/bin/mypy" || mypy_status=$?

pytest_status=0
"$venv/bin/pytest" -q "$@" || pytest_status=$?

# CI: the fuzz tests of the readers of untrusted input again, with a larger fixed budget
# (examples per test; about 2.5 minutes in all on a 2-core machine).
if [ "${CI:-}" = true ] && [ "$pytest_status" -eq 0 ]; then
  DTBUILD_FUZZ_EXAMPLES="${DTBUILD_CI_FUZZ_EXAMPLES:-2000}" "$venv/bin/pytest" -q tests/fuzz || pytest_status=$?
fi

if [ "$pytest_status" -eq 5 ]; then
  echo "test.sh: pytest collected no test: that is a failure" >&2
fi
if [ "$ruff_status" -ne 0 ]; then
  echo "test.sh: ruff check failed (exit $ruff_status)" >&2
fi
if [ "$mypy_status" -ne 0 ]; then
  echo "test.sh: mypy failed (exit $mypy_status)" >&2
fi
if [ "$ruff_status" -ne 0 ] || [ "$mypy_status" -ne 0 ] || [ "$pytest_status" -ne 0 ]; then
  exit 1
fi
