# shellcheck shell=sh
# `invoke train`, before a run starts: writes the artifact store's settings for the run's
# watcher (stdin: the lines of store.env; empty: this stack has no store and the file goes),
# and for a resumed run restores the stored checkpoint dirs into the workdir, printing what it
# restored as one JSON line. Arguments: REMOTE_ROOT RESTORE (1 or 0)
set -e
root=$1 restore=$2
umask 022
tmp=$(mktemp "$root/.store.env.XXXXXX")
cat >"$tmp"
if [ -s "$tmp" ]; then
  mv -f "$tmp" "$root/store.env"
else
  rm -f "$tmp" "$root/store.env"
fi
# A spot machine stopped on interruption and started again by its persistent request resumes
# its interrupted run at boot, with no laptop: cron's @reboot (where the image has cron).
if command -v crontab >/dev/null 2>&1; then
  job="@reboot sleep 30; python3 -I $root/bin/trainstack-store resume-pending >>$root/store.log 2>&1"
  {
    crontab -l 2>/dev/null | grep -v 'trainstack-store resume-pending'
    if [ -f "$root/store.env" ]; then echo "$job"; fi
  } | crontab - || echo "trainstack-node: no @reboot resume (crontab failed)" >&2
fi
if [ "$restore" = 1 ] && [ -f "$root/store.env" ]; then
  exec python3 -I "$root/bin/trainstack-store" restore
fi
