# shellcheck shell=sh
# The node side of `invoke sync --dry-run` by rsync: rsync itself, which with --dry-run
# changes nothing. Arguments: rsync's server arguments.
command -v rsync >/dev/null 2>&1 || { printf 'trainstack-node: rsync-missing\n' >&2; exit 3; }
exec rsync "$@"
