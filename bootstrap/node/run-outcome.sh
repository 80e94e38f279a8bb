# shellcheck shell=sh
# How a run ended on this node, in one round trip: the runner's line for it, who stopped it,
# and rank 0's verdict on the whole run — three sections, each ended by MARKER on a line of
# its own. Arguments: MARKER RUNNER RUN_ID STOPPED_BY_FILE VERDICT_FILE.
marker=$1 runner=$2 run_id=$3 stopped_by=$4 verdict=$5
"$runner" show "$run_id"
printf '\n%s\n' "$marker"
cat -- "$stopped_by" 2>/dev/null
printf '\n%s\n' "$marker"
cat -- "$verdict" 2>/dev/null
printf '\n%s\n' "$marker"
exit 0
