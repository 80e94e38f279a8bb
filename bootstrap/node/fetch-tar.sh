# shellcheck shell=sh
# `invoke fetch` without rsync: a tar stream of the files named on stdin (NUL-separated,
# relative to ROOT), workdir files as paths inside the workdir and the run's log as `log`.
# --no-recursion: a listed link to a directory is sent as the link, never what it points at.
# Arguments: ROOT WORKDIR_NAME RUN_DIR (both relative to ROOT).
cd "$1" || exit 1
exec tar -c -f - -H posix --null --no-recursion -T - --transform "s|^$2/||;s|^$3/||"
