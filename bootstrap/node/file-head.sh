# shellcheck shell=sh
# The first LIMIT bytes of PATH, for a node that offers no SFTP (`remote.sftp.read_remote_head`).
# Arguments: PATH LIMIT. Exits 3 when PATH is not a file.
path=$1 limit=$2
[ -f "$path" ] || exit 3
exec head -c "$limit" -- "$path"
