# shellcheck shell=sh
# `invoke ssh`: the user's login shell on the node, in WORKDIR when it exists (else in the
# SSH user's home, where ssh starts it). Arguments: WORKDIR.
cd "$1" 2>/dev/null || :
exec "${SHELL:-bash}" -l
