#!/usr/bin/env bash
# The whole workflow on the local target (a real sshd on 127.0.0.1), exactly as you would type it:
# start the target, ship examples/, train, follow the log to the end, fetch the results, stop.
# TRAINSTACK_DEMO_PROJECT runs it in another directory (state and fetched runs land there).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
project=${TRAINSTACK_DEMO_PROJECT:-$repo}
cd "$project"

python=${TRAINSTACK_PYTHON:-$repo/.venv/bin/python}
inv() {
  # Echo the command as it could be typed again: an argument with blanks or quotes is quoted.
  local line="+ invoke" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then line+=" $arg"; else line+=" ${arg@Q}"; fi
  done
  echo "$line" >&2
  "$python" -m invoke --search-root "$repo" "$@"
}

export TRAINSTACK_STACK=local
export TRAINSTACK_WORKDIR=$repo/examples

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
echo "results of run $run_id are in $project/$results:"
find "$results" -maxdepth 2 | sort | sed 's/^/  /'
trap - EXIT
inv local.down
