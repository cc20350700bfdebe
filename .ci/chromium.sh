#!/usr/bin/env bash
# --- chromium (report tests) -------------------------------------------------
# Installs Debian's chromium + chromium-driver for tests/test_report_browser.py's headless-browser test,
# which opens report.html with selenium. Idempotent: does nothing when both binaries exist.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    echo "chromium.sh: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
else
    # Root in CI containers; sudo elsewhere (a developer machine).
    SUDO=""
    if [[ "$(id -u)" -ne 0 ]]; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
    echo "chromium.sh: installed $(/usr/bin/chromium --version)"
fi
# --- end chromium -------------------------------------------------------------
