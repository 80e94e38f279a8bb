#!/usr/bin/env bash
# The whole workflow on the local target (a real sshd on 127.0.0.1), exactly as you would type it:
# start the target, ship examples/, train, follow the log to the end, fetch the results, stop.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${TRAINSTACK_PYTHON:-.venv/bin/python}
inv() {
  echo "+ invoke $*" >&2
  "$python" -m invoke "$@"
}

export TRAINSTACK_STACK=local
export TRAINSTACK_WORKDIR=examples

cleanup() {
  inv local.down >/dev/null 2>&1 || true
}
trap cleanup EXIT

inv local.up
inv wait
inv sync
run_id=$(inv train --command "python train.py --epochs 6")
inv logs --run "$run_id" --follow
inv fetch --run "$run_id"
inv status

results=runs/local/$run_id
echo
echo "results of run $run_id are in $(pwd)/$results:"
find "$results" -maxdepth 2 | sort | sed 's/^/  /'
trap - EXIT
inv local.down
