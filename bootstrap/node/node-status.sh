# shellcheck shell=sh
# `invoke status`: the machine's facts and its runs in one round trip, as the runner tells
# them, in two sections each ended by MARKER on a line of its own (the laptop picks it anew
# each time: no output can contain it). Arguments: MARKER RUNNER.
# Exits with the runner's status for `info` (127: no runner yet, the first boot is not done).
marker=$1 runner=$2
"$runner" info
rc=$?
printf '\n%s\n' "$marker"
"$runner" list
printf '\n%s\n' "$marker"
exit $rc
