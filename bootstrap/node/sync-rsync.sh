# shellcheck shell=sh
# The node side of a sync by rsync: run as rsync's remote command (`--rsync-path`), around
# the real `rsync --server`. Sent after sync-lib.sh as `sh -c`'s text.
#
# Arguments: ROOT WORKDIR EXPECT WAIT KEPT_ID NEED_KIB PATCH_BASE SIZES -- <rsync's server arguments>
#   EXPECT      the digest of the manifest the node must hold; "none": it must hold none;
#               "any": the laptop read the node's manifests and planned against all of them
#   NEED_KIB    the space the files rsync sends need on the node (its temporary copies)
#   PATCH_BASE  "node": the new manifest is a patch of the node's; "whole": it is whole
#   SIZES       the byte sizes of the blobs at the head of stdin, comma-separated, in order:
#               header, lines to drop, lines to add, check, owned, delete, force, rmdir
# Stdin: those blobs, then rsync's own stream.
#
# Before rsync runs: the lock, the manifest check, the manifest marked in progress, files
# in the way of shipped ones moved to ROOT/kept/KEPT_ID, deletions (never of a file that
# changed on the node since it was shipped), and mtimes reset where a content change kept
# size and mtime (rsync's quick check would miss it). The new manifest is installed only
# when rsync succeeded.
root=$1 w=$2 expect=$3 wait=$4 kept_id=$5 need=$6 patch_base=$7 sizes=$8
shift 8
[ "$1" = -- ] && shift
m="$root/.trainstack-manifest.json"

command -v rsync >/dev/null 2>&1 || answer rsync-missing
take() {
  if [ "$1" -gt 0 ]; then dd bs="$1" count=1 iflag=fullblock status=none of="$2" || answer stream-broken
  else : > "$2" || answer failed "cannot write in $s"; fi
}

mkdir -p "$root" "$w" || answer failed "cannot create $w"
sync_lock "$root" "$wait"
[ "$expect" = any ] || check_manifest "$m" "$expect"
need_space "$root" "$need"
s=$(scratch_dir "$root/.trainstack-sync.tmp" rsync) || exit 3
trap 'rm -rf "$s"' EXIT
# A client that vanishes (SIGHUP, a broken pipe) ends the script through its EXIT trap.
trap 'exit 129' HUP PIPE INT TERM
old_ifs=$IFS
IFS=,
# shellcheck disable=SC2086 # split on commas, on purpose
set -- $sizes -- "$@"
IFS=$old_ifs
for blob in header removed added check owned delete force rmdir; do
  take "$1" "$s/$blob"
  shift
done
[ "$1" = -- ] && shift

if [ "$patch_base" = node ]; then base="$m"; else base=/dev/null; fi
tail -n +2 "$base" 2>/dev/null | LC_ALL=C comm -23 --nocheck-order - "$s/removed" \
  | LC_ALL=C sort -m - "$s/added" > "$s/body" || answer failed "cannot write in $s"
cat "$s/header" "$s/body" > "$s/new" || answer failed "cannot write in $s"

find_conflicts "$w" "$s"
if [ -s "$s/conflicts" ]; then
  sed -z 's|^\./||' "$s/check" > "$s/check.plain"
  minus "$s/check.plain" "$s/delete" "$s/sent"
  only_in "$s/conflicts" "$s/sent" "$s/in-the-way"
  minus "$s/conflicts" "$s/in-the-way" "$s/left"
  minus "$s/delete" "$s/left" "$s/delete.safe" && mv "$s/delete.safe" "$s/delete"
fi

if [ -f "$m" ]; then mv -f "$m" "$m.partial" || answer failed "cannot write $m"; fi
cp "$s/new" "$m.incoming" || answer failed "cannot write $m.incoming"
if [ -s "$s/in-the-way" ]; then
  keep_aside "$w" "$root/kept/$kept_id" "$s/in-the-way" || answer failed "cannot move files aside into $root/kept/$kept_id"
  report kept "$s/in-the-way"
fi
[ -s "$s/left" ] && report left "$s/left"
cd "$w" || answer failed "cannot enter $w"
xargs -0 -r rm -f -- < "$s/delete" || answer failed "cannot delete in $w"
xargs -0 -r rmdir --ignore-fail-on-non-empty -- < "$s/rmdir" 2>/dev/null
# A zero mtime makes rsync's quick check see these files as changed.
xargs -0 -r touch -c -m -d @0 -- < "$s/force" 2>/dev/null

server=$1
shift
# (A full disk is reported by rsync itself, through the client.)
rsync "$server" --temp-dir="$s" "$@"
rc=$?
[ $rc -eq 0 ] || exit $rc
mv -f "$m.incoming" "$m" && rm -f "$m.partial" || exit 1
exit 0
