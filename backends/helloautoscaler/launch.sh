#!/usr/bin/env bash
# launch.sh: what a Vast instance runs at every boot ("on start") to serve this backend.
# The first boot has no project yet: fetch start_server.sh and pipe it to bash, which fetches the
# project (from VASTWORKER_TARBALL or VASTWORKER_REPO) into $WORKSPACE/vastworker; later boots run
# the start_server.sh that is there.  Set VASTWORKER_SCRIPT_URL to your copy's start_server.sh.
set -euo pipefail

BACKEND="helloautoscaler"
PROJECT="${WORKSPACE:-/home/workspace}/vastworker"

if [ -f "$PROJECT/start_server.sh" ]; then
    bash "$PROJECT/start_server.sh" "$BACKEND"
elif [ -n "${VASTWORKER_SCRIPT_URL:-}" ]; then
    wget -qO- "$VASTWORKER_SCRIPT_URL" | bash -s "$BACKEND"
else
    echo "vastworker: error: set VASTWORKER_SCRIPT_URL to the URL of your copy's start_server.sh" >&2
    exit 1
fi
