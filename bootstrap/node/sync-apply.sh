# shellcheck shell=sh
# The node side of a sync that ships files as a tar stream (a small change set, the
# first sync, or any sync when rsync is missing). Sent after sync-lib.sh as `sh -c`'s text.
#
# Arguments: ROOT WORKDIR EXPECT WAIT KEPT_ID NEED_KIB COMPRESSION [PATH...]
#   ROOT      <remote_root>; the manifest, lock, scratch and kept/ live there
#   WORKDIR   the synced project's directory on the node
#   EXPECT    the digest of the manifest the node must hold; "none": it must hold none (a
#             first sync); "any": the laptop read the node's manifests and planned against all
#   WAIT      seconds to wait for another sync's lock
#   KEPT_ID   the name of this sync's directory under kept/, should anything be moved aside
#   NEED_KIB  the space the files need on the node (0: no check before the stream)
#   COMPRESSION  "zstd": the stream is one zstd frame (on a real network); "none": plain tar
#   PATH...   "./path" of every file this sync writes or deletes, when the laptop lists them
#             here (a small change set); else the stream's .trainstack/check, or for a
#             first sync the stream's own files
# Stdin: one tar stream (several archives back to back) holding the files to install at
# their paths, and under .trainstack/: check, owned, delete, rmdir (NUL-separated lists)
# and, last, either `manifest` (whole) or `patch` (header line, the number of entry lines
# to drop, those lines, the lines to add).
#
# Nothing in the workdir changes until the whole stream has arrived. A file at a path this
# sync writes that sync did not put there (or that changed since) is moved to
# ROOT/kept/KEPT_ID/path first; one that a deletion would remove is left where it is.
root=$1 w=$2 expect=$3 wait=$4 kept_id=$5 need=$6 compression=$7
shift 7
m="$root/.trainstack-manifest.json"

if [ "$compression" = zstd ] && ! command -v zstd >/dev/null 2>&1; then answer zstd-missing; fi
[ -d "$root" ] || mkdir -p "$root" || answer failed "cannot create $root"
sync_lock "$root" "$wait"
[ "$expect" = any ] || check_manifest "$m" "$expect"
[ "$need" -gt 0 ] && need_space "$root" "$need"
s=$(scratch_dir "$root/.trainstack-sync.tmp" apply) || exit 3
trap 'rm -rf "$s"' EXIT
# A client that vanishes (SIGHUP, a broken pipe) ends the script through its EXIT trap.
trap 'exit 129' HUP PIPE INT TERM
mkdir "$s/f" || answer failed "cannot write in $s"

# -i: the manifest follows the files as an archive of its own.
if [ "$compression" = zstd ]; then
  err=$({ zstd -d -q -c | tar -x -i -p --no-same-owner -f - -C "$s/f"; } 2>&1)
else
  err=$(tar -x -i -p --no-same-owner -f - -C "$s/f" 2>&1)
fi
# shellcheck disable=SC2181 # the status of the extraction just above
if [ $? -ne 0 ]; then
  rm -rf "$s/f"
  if is_disk_full "$err"; then answer disk-full "$(df -Pk "$root" | awk 'NR == 2 { print $4 }')"; fi
  answer stream-broken "$err"
fi
c="$s/f/.trainstack"
if [ ! -f "$c/manifest" ] && [ ! -f "$c/patch" ]; then answer stream-broken "the stream ended early"; fi
mv "$c" "$s/c" || answer failed "cannot write in $s"
c="$s/c"
for list in check owned delete rmdir; do [ -f "$c/$list" ] || : > "$c/$list"; done


# From here on the client may vanish: the node finishes on its own.
trap '' HUP PIPE INT TERM

# The new manifest, before anything moves.
if [ -f "$c/manifest" ]; then
  mv "$c/manifest" "$c/new" || answer failed "cannot write in $s"
else
  # Entry lines are in byte order: a merge keeps the patched manifest sorted.
  LC_ALL=C awk '
    FILENAME == ARGV[1] && FNR == 1 { print; next }
    FILENAME == ARGV[1] && FNR == 2 { r = $0 + 2; next }
    FILENAME == ARGV[1] && FNR <= r { gone[$0] = 1; next }
    FILENAME == ARGV[1] { add[++n] = $0; next }
    FNR == 1 || ($0 in gone) { next }
    { while (k < n && (add[k + 1] "") < ($0 "")) print add[++k]; print }
    END { while (k < n) print add[++k] }
  ' "$c/patch" "$m" > "$c/new" || answer failed "cannot patch $m"
fi

if [ -d "$w" ] && [ -n "$(ls -A "$w")" ]; then
  if [ "$expect" = none ] && [ $# -eq 0 ]; then
    # A first sync into a workdir that holds files: what it writes is what arrived.
    (cd "$s/f" && find . -mindepth 1 \( -type f -o -type l \) -print0) > "$c/check"
  fi
  find_conflicts "$w" "$c" "$@"
else
  : > "$c/conflicts"
fi
if [ -s "$c/conflicts" ]; then
  (cd "$s/f" && find . -mindepth 1 \( -type f -o -type l \) -print0 | sed -z 's|^\./||') > "$c/shipped"
  only_in "$c/conflicts" "$c/shipped" "$c/in-the-way"
  minus "$c/conflicts" "$c/in-the-way" "$c/left"
  minus "$c/delete" "$c/left" "$c/delete.safe" && mv "$c/delete.safe" "$c/delete"
fi

if [ -f "$m" ]; then mv -f "$m" "$m.partial" || answer failed "cannot write $m"; fi
rc=0
if [ -s "$c/in-the-way" ]; then
  keep_aside "$w" "$root/kept/$kept_id" "$c/in-the-way" || answer failed "cannot move files aside into $root/kept/$kept_id"
  report kept "$c/in-the-way"
fi
report left "$c/left"
if [ -s "$c/delete" ]; then (cd "$w" && xargs -0 rm -f -- < "$c/delete") || rc=1; fi
if [ -s "$c/rmdir" ]; then (cd "$w" && xargs -0 rmdir --ignore-fail-on-non-empty -- < "$c/rmdir") 2>/dev/null; fi
rmdir "$s/f" 2>/dev/null  # nothing arrived (a change set of deletions only)
err=
if [ -d "$s/f" ]; then
  if [ ! -e "$w" ] || { [ -z "$(ls -A "$w")" ] && rmdir "$w" 2>/dev/null; }; then
    # Into an empty workdir (not a mount point): one rename.
    err=$(mv -T "$s/f" "$w" 2>&1) || rc=1
  elif ! cp -a -l --remove-destination "$s/f/." "$w/" 2>/dev/null; then
    # Hard links cost no copy; a workdir on another file system (a mounted volume) gets copies.
    err=$(cp -a --remove-destination "$s/f/." "$w/" 2>&1) || rc=1
  fi
fi
if [ $rc -ne 0 ]; then
  if is_disk_full "$err"; then answer disk-full; fi
  answer failed "could not put the files in place in $w: $(printf '%s\n' "$err" | tail -n 1)"
fi
mv -f "$c/new" "$m" || answer failed "cannot write $m"
rm -f "$m.partial" "$m.incoming"
exit 0
