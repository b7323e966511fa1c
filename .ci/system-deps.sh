#!/usr/bin/env bash
# Debian packages the tests run for real: PostgreSQL (the sink's database) and
# Mosquitto (the MQTT bridge's broker). Installs only what is missing; the tests
# start their own servers on 127.0.0.1 ports (no systemd, no service left running).
# `make test` and `.ci/run` call this; it needs root or passwordless sudo the first
# time, and does nothing once the binaries are there.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "system-deps: the tests need the Debian packages ${need[*]}; install them" \
       "(apt-get install ${need[*]}) or run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# package lists may be missing on a new machine: update only when an install fails
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
  "${SUDO[@]}" apt-get update -q >/dev/null
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
}
# Debian starts the services it installs where it can; the tests run their own
for svc in mosquitto postgresql; do
  "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
done
echo "system-deps: installed ${need[*]}"
