# shellcheck shell=sh
# The auto-stop probe (`invoke status`, `invoke down`): `key=value` lines — the node's clock
# and uptime, its active runs, and the watchdog's state file on one line.
# Arguments: ROOT RUNNER STATE_FILE (relative to ROOT).
# Which runs are active is the runner's answer, the one rule the watchdog asks too. A runner
# installed before `active` existed gives the same answer as its runs in state "running".
root=$1 runner=$2 state=$3
printf 'now=%s\n' "$(date +%s)"
read -r up _ < /proc/uptime && printf 'uptime=%s\n' "$up"
{ "$runner" active 2>/dev/null || "$runner" list 2>/dev/null | awk -F '\t' '$2 == "running" { print $1 }'; } \
  | sed 's/^/run=/'
if [ -f "$root/$state" ]; then
  printf 'watchdog='
  tr -d '\n' < "$root/$state"
  echo
fi
