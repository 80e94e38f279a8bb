# shellcheck shell=sh
# `invoke fetch` and `invoke down`: in one round trip, what fetch needs to know of the node.
# Arguments: MARKER WORKDIR RUNNER RUNS [RESULTS_DIR...] (RUNNER empty: the files only).
#
# With RUNNER, first two sections, each ended by MARKER on a line of its own (the laptop
# picks it anew each time: no output can contain it):
#   the runner's exit status for `list` on a line, then its lines (one per run);
#   for each run dir, NUL-separated "SIZE MTIME RUN/NAME" of its started_at, finished_at and
#   log: the mtimes of the first two are the run's lifetime, to the nanosecond.
# Then, NUL-separated, "MODE SIZE MTIME BIRTH ./PATH" (MODE in hex; BIRTH 0 or '-' where the
# file system keeps none) of every file and link in the results dirs, relative to WORKDIR.
# Links inside a results dir are listed as links, never followed; a results dir that is
# itself a link (to a bigger volume) is read through (find -H).
marker=$1 workdir=$2 runner=$3 runs=$4
shift 4
if [ -n "$runner" ]; then
  listing=$("$runner" list)
  rc=$?
  printf '%s\n%s\n%s\n' "$rc" "$listing" "$marker"
  [ "$rc" -eq 0 ] || exit 0
  if cd "$runs" 2>/dev/null; then
    find . -mindepth 2 -maxdepth 2 -type f \( -name started_at -o -name finished_at -o -name log \) \
      -printf '%s %T@ %P\0'
  fi
  printf '%s\n' "$marker"
fi
cd "$workdir" 2>/dev/null || exit 0
for rel in "$@"; do
  if [ -e "$rel" ] || [ -L "$rel" ]; then
    find -H "./$rel" \( -type f -o -type l \) -print0
  fi
done | xargs -0 -r stat --printf '%f %s %.9Y %.9W %n\0' || :
