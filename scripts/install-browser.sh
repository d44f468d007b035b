#!/usr/bin/env bash
# Install Debian's chromium (and a font, so pages render text on a bare machine) for the report's
# browser test, tests/report/test_browser.py. Does nothing when chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-browser.sh: chromium is missing and this user can neither install packages" \
         "(not root) nor use sudo; install Debian's chromium package" >&2
    exit 1
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Quiet on success; apt's full output on failure.
if ! { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-browser.sh: installing chromium failed" >&2
    exit 1
fi
command -v chromium >/dev/null
