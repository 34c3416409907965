#!/usr/bin/env bash
# Debian packages server-roaming needs at run time and in its tests. Needs root.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (apt-get needs it)" >&2
  exit 1
fi
packages=(
  nftables iptables conntrack iproute2 ethtool iputils-ping procps   # kernel plumbing
  build-essential python3-dev                                        # to build Python extensions
  iperf3 curl tcpdump redis-tools                                    # real clients
  nginx-light redis-server haproxy memcached                         # real services, baseline
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts these services on install where an init system runs; our labs start their
# own instances inside namespaces, so the system-wide ones are not wanted.
for service in nginx redis-server haproxy memcached; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
done
