# shellcheck shell=sh
# The node side of a sync's session, opened as the sync starts (before the laptop knows
# what changed). Arguments: MARKER MANIFEST.
# It prints MARKER (whatever a login shell printed first is skipped up to it) and the first
# line of the node's manifest, then waits. EOF: nothing more to do (a no-op). A byte count
# on a line of its own: a program of that many bytes follows on stdin, with its own input
# after it, and runs in this shell (a small change set, sync-apply.sh).
marker=$1 manifest=$2
{ IFS= read -r header < "$manifest"; } 2>/dev/null || header=
printf '%s\n%s\n' "$marker" "$header"
IFS= read -r size || exit 0
case $size in ''|*[!0-9]*) exit 0 ;; esac
program=$(dd bs="$size" count=1 iflag=fullblock status=none) || exit 1
eval "$program"
