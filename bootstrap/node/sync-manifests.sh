# shellcheck shell=sh
# The node's sync manifests, for a sync that must learn what the node holds: the complete
# one, the one before a transfer under way (.partial) and that transfer's (.incoming),
# each ended by MARKER on a line of its own (a missing one is empty; the laptop picks the
# marker anew each time). Arguments: MARKER MANIFEST.
marker=$1 manifest=$2
for file in "$manifest" "$manifest.partial" "$manifest.incoming"; do
  cat -- "$file" 2>/dev/null
  printf '\n%s\n' "$marker"
done
