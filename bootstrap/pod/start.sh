#!/usr/bin/env bash
# The start of a trainstack machine on RunPod: the pod's main process, run as root by the pod's
# start command (infra/pod_start.py) in place of the image's own. A pod has no cloud-init and no
# systemd, so this does what they do on EC2:
#
#   1. puts poweroff/shutdown/halt in /usr/local/sbin (ahead of the system's on every PATH): in a
#      pod they end the pod through RunPod's API (runpodctl stop|remove pod), so the idle
#      watchdog's power-off stops the billing as it does on EC2;
#   2. removes every SSH host key the image brought, then runs the first-boot script
#      (TRAINSTACK_BOOTSTRAP, the same script EC2 machines run), which installs the packages
#      (openssh-server among them), authorizes the client key, installs the pinned host key,
#      starts the watchdog and writes <remote_root>/ready.json;
#   3. starts sshd once the host key on disk is the pinned one (TRAINSTACK_HOST_PUBLIC_KEY) and
#      no other, so a client never sees a key it has not pinned; keeps it running;
#   4. never exits while the pod should live; SIGTERM ends sshd and the watchdog, then itself.
#
# Environment (names in infra/pod_start.py): TRAINSTACK_BOOTSTRAP (secret), TRAINSTACK_HOST_PUBLIC_KEY,
# TRAINSTACK_REMOTE_ROOT, TRAINSTACK_POD_ON_IDLE (stop | terminate); RunPod sets RUNPOD_POD_ID and
# RUNPOD_API_KEY in every pod.
#
#   start.sh              start the machine (the pod's main process)
#   start.sh --stop-pod   end this pod as TRAINSTACK_POD_ON_IDLE says (what the shims run)
set -Euo pipefail
umask 022

POD_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PID_FILE="$POD_DIR/start.pid"
ON_IDLE_FILE="$POD_DIR/on-idle"
SHIM_DIR=/usr/local/sbin
SHIMS="poweroff shutdown halt"
SSHD=/usr/sbin/sshd
CHECK_SECONDS=10

log() {
  printf '%s trainstack-pod: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# A variable of the main process's environment: an SSH session's shell (where a user may type
# poweroff) does not inherit RUNPOD_POD_ID and RUNPOD_API_KEY.
start_env() {
  local name=$1 pid
  pid=$(cat "$PID_FILE" 2>/dev/null || true)
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n "s/^$name=//p" | head -n 1
}

stop_pod() {
  local arg action verb doing pod_id api_key pid
  for arg in "$@"; do
    case $arg in
      -c) log "nothing to cancel"; return 0 ;;
      -r | --reboot) log "a pod cannot reboot: stop it and start it again (runpodctl)"; return 1 ;;
    esac
  done
  action=$(cat "$ON_IDLE_FILE" 2>/dev/null || echo stop)
  verb=stop doing=stopping
  if [ "$action" = terminate ]; then
    verb=remove doing=terminating
  fi
  pod_id=${RUNPOD_POD_ID:-$(start_env RUNPOD_POD_ID)}
  api_key=${RUNPOD_API_KEY:-$(start_env RUNPOD_API_KEY)}
  if [ -n "$pod_id" ] && command -v runpodctl >/dev/null 2>&1; then
    log "$doing pod $pod_id through RunPod's API"
    if [ -n "$api_key" ]; then
      export RUNPOD_API_KEY=$api_key
    fi
    if runpodctl "$verb" pod "$pod_id"; then
      return 0
    fi
    log "runpodctl $verb pod $pod_id failed"
  else
    log "no runpodctl or RUNPOD_POD_ID here"
  fi
  # The pod's own stopAfter/terminateAfter remain; ending the main process ends the container.
  pid=$(cat "$PID_FILE" 2>/dev/null || true)
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    log "ending the pod's main process ($pid)"
    kill -TERM "$pid"
    return 0
  fi
  log "no main process to end"
  return 1
}

if [ "${1:-}" = --stop-pod ]; then
  shift
  stop_pod "$@"
  exit
fi

# --- the machine's start -------------------------------------------------------------------

fail() {
  log "$*"
  exit 2
}

BOOTSTRAP_PACKED=${TRAINSTACK_BOOTSTRAP:-}
HOST_PUBLIC_KEY=${TRAINSTACK_HOST_PUBLIC_KEY:-}
REMOTE_ROOT=${TRAINSTACK_REMOTE_ROOT:-}
ON_IDLE=${TRAINSTACK_POD_ON_IDLE:-stop}
# The first-boot script holds the host key's private half: no child process needs it.
unset TRAINSTACK_BOOTSTRAP TRAINSTACK_POD_START
[ -n "$BOOTSTRAP_PACKED" ] || fail "TRAINSTACK_BOOTSTRAP is not set: declare the pod with trainstack's Pulumi program"
[ -n "$HOST_PUBLIC_KEY" ] || fail "TRAINSTACK_HOST_PUBLIC_KEY is not set: declare the pod with trainstack's Pulumi program"
[[ $REMOTE_ROOT =~ ^/[A-Za-z0-9._/-]*$ ]] || fail "TRAINSTACK_REMOTE_ROOT '$REMOTE_ROOT' is not an absolute path"
case $ON_IDLE in
  stop | terminate) ;;
  *) fail "TRAINSTACK_POD_ON_IDLE '$ON_IDLE' must be stop or terminate" ;;
esac
case ":$PATH:" in
  *":$SHIM_DIR:"*) ;;
  *) PATH="$SHIM_DIR:$PATH" ;;
esac
export PATH

echo "$$" >"$PID_FILE"
printf '%s\n' "$ON_IDLE" >"$ON_IDLE_FILE"

install_shims() {
  local name
  mkdir -p "$SHIM_DIR"
  for name in $SHIMS; do
    # shellcheck disable=SC2016 # "$@" is the shim's own, written as it is
    printf '#!/bin/sh\n# trainstack: in a RunPod pod, a power-off ends the pod.\nexec /bin/bash %s --stop-pod "$@"\n' \
      "$POD_DIR/start.sh" >"$SHIM_DIR/$name.trainstack-new"
    chmod 0755 "$SHIM_DIR/$name.trainstack-new"
    mv -f "$SHIM_DIR/$name.trainstack-new" "$SHIM_DIR/$name"
  done
}

# The watchdog's clocks start at the later of the boot and watchdog.env's last change, and its
# idle clock survives a restart of the same boot. A container has the host's boot: a pod started
# again (its volume, with remote_root, kept) starts both clocks afresh, as a started EC2 machine does.
restart_watchdog_clocks() {
  if [ -f "$REMOTE_ROOT/watchdog.env" ]; then
    touch "$REMOTE_ROOT/watchdog.env"
    rm -f "$REMOTE_ROOT/watchdog.json"
  fi
}

remove_host_keys() {
  local keep=${1:-} key
  for key in /etc/ssh/ssh_host_*; do
    [ -e "$key" ] || continue
    case $key in
      "$keep" | "$keep.pub") ;;
      *) rm -f "$key" ;;
    esac
  done
}

run_bootstrap() {
  local script rc=0
  script=$(mktemp "$POD_DIR/bootstrap.XXXXXX")
  chmod 0700 "$script"
  if ! printf '%s' "$BOOTSTRAP_PACKED" | base64 -d | gzip -dc >"$script"; then
    rm -f "$script"
    log "TRAINSTACK_BOOTSTRAP is not base64 of a gzip file"
    return 1
  fi
  bash "$script" || rc=$?
  rm -f "$script"
  return "$rc"
}

# sshd may start only when the one host key it will offer is the pinned one.
pinned_key_installed() {
  local key=/etc/ssh/ssh_host_ed25519_key derived
  [ -f "$key" ] && [ -f /etc/ssh/sshd_config.d/10-trainstack.conf ] || return 1
  derived=$(ssh-keygen -y -f "$key" 2>/dev/null) || return 1
  [ "$(printf '%s' "$derived" | cut -d' ' -f1-2)" = "$(printf '%s' "$HOST_PUBLIC_KEY" | cut -d' ' -f1-2)" ]
}

SSHD_PID=""
start_sshd() {
  install -d -m 0755 /run/sshd
  if ! "$SSHD" -t; then
    log "sshd's configuration does not load (sshd -t above)"
    return 1
  fi
  "$SSHD" -D -e &
  SSHD_PID=$!
  log "sshd started (pid $SSHD_PID)"
}

SLEEP_PID=""
on_term() {
  trap - TERM INT
  log "ending: stopping sshd and the watchdog"
  local watchdog
  watchdog=$(cat "$REMOTE_ROOT/watchdog.pid" 2>/dev/null || true)
  if [[ $watchdog =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$watchdog/cmdline" 2>/dev/null | grep -q trainstack-watchdog; then
    kill -TERM "$watchdog" 2>/dev/null || true
  fi
  [ -z "$SSHD_PID" ] || kill -TERM "$SSHD_PID" 2>/dev/null || true
  [ -z "$SLEEP_PID" ] || kill -TERM "$SLEEP_PID" 2>/dev/null || true
  rm -f "$PID_FILE"
  exit 0
}
trap on_term TERM INT

log "starting (remote root $REMOTE_ROOT, a power-off does: $ON_IDLE)"
install_shims
restart_watchdog_clocks
remove_host_keys
if run_bootstrap; then
  log "first boot ok"
else
  log "first boot failed: see $REMOTE_ROOT/bootstrap.log"
fi
# Installing openssh-server generates host keys of every type: only the pinned one stays.
remove_host_keys /etc/ssh/ssh_host_ed25519_key

SSHD_STARTED=0
while :; do
  if [ -z "$SSHD_PID" ] || ! kill -0 "$SSHD_PID" 2>/dev/null; then
    if [ -n "$SSHD_PID" ]; then
      wait "$SSHD_PID" 2>/dev/null
      log "sshd (pid $SSHD_PID) exited with $?"
      SSHD_PID=""
    fi
    if [ ! -x "$SSHD" ]; then
      [ "$SSHD_STARTED" = 2 ] || log "no $SSHD: the first boot did not install openssh-server"
      SSHD_STARTED=2
    elif pinned_key_installed; then
      start_sshd && SSHD_STARTED=1
    else
      [ "$SSHD_STARTED" = 3 ] || log "the pinned host key is not installed: sshd stays off"
      SSHD_STARTED=3
    fi
  fi
  sleep "$CHECK_SECONDS" &
  SLEEP_PID=$!
  wait "$SLEEP_PID" 2>/dev/null || true
  SLEEP_PID=""
done
