#!/usr/bin/env bash
# Install the system packages the test suite needs: Debian's chromium and its
# chromedriver (the HTML report is opened in a real headless browser).
# Idempotent: does nothing when both are already on PATH. Needs root (or sudo).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "chromium and chromedriver already installed" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then SUDO="sudo"; else
        echo "install-system-deps: need root to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
have chromium && have chromedriver
