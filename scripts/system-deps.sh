#!/usr/bin/env bash
# Install the Debian packages listed in scripts/system-packages.txt whose
# command is missing. Idempotent: does nothing when everything is there.
# Needs root (or sudo) only when something must be installed.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
while read -r package command; do
  case "$package" in ''|'#'*) continue ;; esac
  command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done < system-packages.txt

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  run=()
elif command -v sudo >/dev/null 2>&1; then
  run=(sudo)
else
  echo "These Debian packages are needed by the tests: ${missing[*]}" >&2
  echo "Install them (apt-get install ${missing[*]}) as root, then run make test again." >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${run[@]}" apt-get update -qq
"${run[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
