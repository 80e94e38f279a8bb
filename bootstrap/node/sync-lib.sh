# shellcheck shell=sh
# Functions shared by the node side of `invoke sync` (sync-apply.sh, sync-rsync.sh).
# The laptop sends this file followed by one script as the text of `sh -c`, with every
# value as a positional argument: nothing here is templated. POSIX sh plus GNU coreutils,
# findutils and util-linux's flock, as on every image trainstack runs on.
#
# Answers: a script tells the laptop what happened in lines on stderr of the form
#   trainstack-node: <word> [<detail>]
# (`answer`, `report`); `trainstack.remote.answers` is their only reader, and the words are
# `contract.NodeAnswer`'s. File names travel hex-encoded (any byte but NUL is allowed in them).

# answer WORD [DETAIL]: the outcome, on stderr, then exit non-zero.
answer() {
  printf 'trainstack-node: %s %s\n' "$1" "${2:-}" >&2
  exit 3
}

# report WORD FILE: a NUL-separated list of paths, hex-encoded, on one stderr line.
report() {
  [ -s "$2" ] || return 0
  printf 'trainstack-node: %s %s\n' "$1" "$(od -An -v -tx1 < "$2" | tr -d ' \n')" >&2
}

# sync_lock ROOT WAIT: one sync per node. The lock is held by fd 9 until the script (and
# every process it started, such as rsync's server) has exited, however it ends; a sync whose
# client vanished is ended by its broken pipe or SIGHUP, which frees the lock with it.
sync_lock() {
  command -v flock >/dev/null 2>&1 || answer failed "flock is not installed on the machine: install util-linux there"
  exec 9>"$1/.trainstack-sync.lock" || answer failed "cannot create $1/.trainstack-sync.lock"
  if ! flock -n 9; then
    printf 'trainstack-node: waiting\n' >&2
    flock -w "$2" 9 || answer lock-held "$2"
  fi
}

# scratch_dir SCRATCH KIND: a fresh directory for this sync alone. Under the lock no other
# sync is running, so whatever an earlier, interrupted sync left in SCRATCH is removed first
# (shell globs tell whether there is anything: no process for the usual empty dir).
scratch_dir() {
  if [ -d "$1" ]; then
    for stale in "$1"/* "$1"/.[!.]*; do
      if [ -e "$stale" ] || [ -L "$stale" ]; then rm -rf -- "$stale"; fi
    done
  else
    mkdir -p "$1" || answer failed "cannot create $1"
  fi
  mkdir "$1/$2.$$" || answer failed "cannot create a directory in $1"
  printf '%s\n' "$1/$2.$$"
}

# check_manifest MANIFEST EXPECT: the node still holds what the laptop planned against.
# EXPECT: a manifest digest, or "none" (no manifest and no sync under way).
check_manifest() {
  if [ "$2" = none ]; then
    if [ -e "$1" ] || [ -e "$1.partial" ] || [ -e "$1.incoming" ]; then answer manifest-changed; fi
    return 0
  fi
  { IFS= read -r header < "$1"; } 2>/dev/null || header=
  case $header in
    *"\"digest\": \"$2\""*) ;;
    *) answer manifest-changed ;;
  esac
}

# node_states WORKDIR LIST [PATH...]: the state of each path, in the order given, as the
# laptop writes its expected states: "f SIZE MTIME ./path", "l SIZE - ./path", or
# "TYPE - - ./path" for anything else; absent paths print nothing. NUL-terminated records.
# The paths are the arguments when there are any, else the NUL-separated LIST file.
node_states() {
  states_dir=$1 states_list=$2
  shift 2
  if [ $# -gt 0 ]; then
    (cd "$states_dir" && find "$@" -maxdepth 0 \
      \( -type l -printf 'l %s - %p\0' \) -o \( -type f -printf 'f %s %Ts %p\0' \) -o -printf '%y - - %p\0') 2>/dev/null
  elif [ -s "$states_list" ]; then
    (cd "$states_dir" && xargs -0 sh -c 'exec find "$@" -maxdepth 0 \
      \( -type l -printf "l %s - %p\0" \) -o \( -type f -printf "f %s %Ts %p\0" \) -o -printf "%y - - %p\0"' \
      node-states < "$states_list") 2>/dev/null
  fi
  return 0
}

# find_conflicts WORKDIR DIR [PATH...]: the paths (of DIR/check, or the arguments) whose
# state on the node is neither absent nor one the laptop knows sync shipped (DIR/owned),
# into DIR/conflicts, NUL-separated, without their "./".
find_conflicts() {
  conflicts_w=$1 conflicts_c=$2
  shift 2
  node_states "$conflicts_w" "$conflicts_c/check" "$@" > "$conflicts_c/states"
  if cmp -s "$conflicts_c/states" "$conflicts_c/owned"; then
    : > "$conflicts_c/conflicts"  # every path is as sync left it: the usual case
    return 0
  fi
  LC_ALL=C sort -z -u "$conflicts_c/owned" > "$conflicts_c/owned.sorted"
  LC_ALL=C sort -z "$conflicts_c/states" | LC_ALL=C comm -z -23 - "$conflicts_c/owned.sorted" \
    | sed -z 's|^[^ ]* [^ ]* [^ ]* \./||' > "$conflicts_c/conflicts"
}

# keep_aside WORKDIR KEPT LIST: move each listed path (relative to WORKDIR) to KEPT/path.
keep_aside() {
  [ -s "$3" ] || return 0
  mkdir -p "$2" || return 1
  # shellcheck disable=SC2016 # expanded by the inner sh
  (cd "$1" && xargs -0 sh -c 'for p do mkdir -p "$0/$(dirname "$p")" && mv -T -- "$p" "$0/$p" || exit 1; done' "$2" < "$3")
}

# minus A B OUT: the NUL-separated entries of A that are not in B.
minus() {
  if [ -s "$2" ]; then
    LC_ALL=C sort -z -u "$2" > "$2.sorted"
    LC_ALL=C sort -z -u "$1" | LC_ALL=C comm -z -23 - "$2.sorted" > "$3"
  else
    cp "$1" "$3"
  fi
}

# only_in A B OUT: the NUL-separated entries of A that are also in B.
only_in() {
  LC_ALL=C sort -z -u "$2" > "$2.sorted"
  LC_ALL=C sort -z -u "$1" | LC_ALL=C comm -z -12 - "$2.sorted" > "$3"
}

# need_space DIR KIB: refuse, before anything changes, a sync that cannot fit.
need_space() {
  # shellcheck disable=SC2046 # two numbers: free blocks, block size
  set -- "$2" $(stat -f -c '%a %S' "$1" 2>/dev/null)
  [ $# -eq 3 ] || return 0
  avail=$(( $2 * $3 / 1024 ))
  [ "$avail" -ge "$1" ] || answer disk-full "$avail"
}

# is_disk_full TEXT: whether an error message says the disk (or its inodes) ran out.
is_disk_full() {
  case $1 in
    *"No space left on device"*|*"Disk quota exceeded"*) return 0 ;;
  esac
  return 1
}
