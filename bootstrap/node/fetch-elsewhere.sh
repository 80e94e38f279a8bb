# shellcheck shell=sh
# `invoke fetch`, for a run that wrote nothing into the results dirs: the files in the
# workdir newer than the run's start (and not newer than its end), NUL-separated, relative to
# the workdir, at most LIMIT of them; .git and __pycache__ left out.
# Arguments: WORKDIR LIMIT STARTED_AT [FINISHED_AT] (the run's stamp files, whose mtimes are
# its lifetime).
workdir=$1 limit=$2 started=$3 finished=${4:-}
cd "$workdir" 2>/dev/null || exit 0
if [ -n "$finished" ]; then
  find . \( -name .git -o -name __pycache__ \) -prune -o \( -type f -o -type l \) \
    -newer "$started" ! -newer "$finished" -printf '%P\0' 2>/dev/null
else
  find . \( -name .git -o -name __pycache__ \) -prune -o \( -type f -o -type l \) \
    -newer "$started" -printf '%P\0' 2>/dev/null
fi | head -z -n "$limit"
exit 0
