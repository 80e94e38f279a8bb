# shellcheck shell=sh
# `invoke train` installs the node tools (bootstrap/tools/) that are missing or differ into
# BIN_DIR. Stdin: a tar archive of them. They are unpacked aside and renamed into place, so
# a runner starting meanwhile never sees half a file. Arguments: BIN_DIR.
set -e
bin=$1
umask 022
mkdir -p "$bin"
d=$(mktemp -d "$bin/.tools.XXXXXX")
trap 'rm -rf "$d"' EXIT
tar -x --no-same-owner -f - -C "$d"
for f in "$d"/*; do mv -f "$f" "$bin/"; done
