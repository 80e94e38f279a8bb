# shellcheck shell=sh
# The node's sync manifests, for a sync that must learn what the node holds: the complete
# one, the one before a transfer under way (.partial) and that transfer's (.incoming),
# each followed by SEPARATOR on a line of its own (a missing one is empty).
# Arguments: MANIFEST SEPARATOR. Manifests are JSON lines: SEPARATOR cannot occur in them.
manifest=$1 separator=$2
for file in "$manifest" "$manifest.partial" "$manifest.incoming"; do
  cat -- "$file" 2>/dev/null
  printf '%s\n' "$separator"
done
