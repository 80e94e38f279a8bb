# shellcheck shell=sh
# `invoke fetch`: the node's end of rsync (its --rsync-path), which says plainly when rsync
# is not installed (fetch then uses tar). Arguments: rsync's own.
command -v rsync >/dev/null 2>&1 || { echo 'trainstack-fetch: rsync-missing' >&2; exit 127; }
exec rsync "$@"
