#!/usr/bin/env bash
# The project's test command (README, .ci/run). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  # pytest exits 5 when it collected nothing: for this project that is a broken selection or
  # a missing test tree, never a success.
  echo "run-tests: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$status"
