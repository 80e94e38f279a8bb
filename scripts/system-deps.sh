#!/usr/bin/env bash
# Installs (as root) or names (otherwise) the Debian packages trainstack's demo and tests need.
# Usage: scripts/system-deps.sh demo|test
set -euo pipefail

purpose=${1:-test}
packages=(openssh-server openssh-client rsync git procps zstd)
if [ "$purpose" = test ]; then
  packages+=(shellcheck debootstrap iproute2 util-linux)
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package's own sshd service is not ours; tests and the local target start their own.
  exit 0
fi

echo "missing Debian packages: ${missing[*]} — run: sudo apt-get install ${missing[*]}" >&2
exit 1
