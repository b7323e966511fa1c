#!/usr/bin/env bash
# Debian packages the tests run for real: PostgreSQL (the sink's database) and
# Mosquitto (the MQTT bridge's broker). Installs only what is missing; the tests
# start their own servers on 127.0.0.1 ports (no systemd, no service left running).
# `make test` and `.ci/run` call this; it needs root or passwordless sudo the first
# time, and does nothing once the binaries are there.
set -euo pipefail

missing() {
  need=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
}
missing
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
wanted=("${need[@]}")
# A package's post-install script may fail to start its service where no init
# system runs; the binaries are what the tests need, so they decide success.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${wanted[@]}" >/dev/null 2>&1 || true
missing
if [ ${#need[@]} -gt 0 ]; then  # package lists missing or stale on a new machine
  "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 || true
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || true
  missing
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "system-deps: could not install ${need[*]} (apt-get install ${need[*]} failed)" >&2
  exit 1
fi
# Debian starts the services it installs where it can; the tests run their own
for svc in mosquitto postgresql; do
  "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
done
echo "system-deps: installed ${wanted[*]}"
