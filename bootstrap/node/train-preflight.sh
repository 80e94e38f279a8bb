# shellcheck shell=sh
# `invoke train`, before a run starts: in one round trip, the first boot's outcome, the
# node's runs, the digests of the node's copies of the tools, and the venv's last install
# record — four sections, each ended by MARKER on a line of its own.
# Arguments: MARKER READY_JSON RUNNER BIN_DIR VENV_PYTHON INSTALL_RECORD TOOL...
# Exits with the runner's status for `list` (127: no runner yet).
marker=$1 ready=$2 runner=$3 bin=$4 python=$5 record=$6
shift 6
cat -- "$ready" 2>/dev/null
printf '\n%s\n' "$marker"
"$runner" list
rc=$?
printf '\n%s\n' "$marker"
(cd "$bin" 2>/dev/null && sha256sum -- "$@" 2>/dev/null)
printf '\n%s\n' "$marker"
if [ -x "$python" ]; then
  echo venv
  cat -- "$record" 2>/dev/null
fi
printf '\n%s\n' "$marker"
exit $rc
