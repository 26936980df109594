#!/usr/bin/env bash
# launch.sh: what a Vast instance runs at every boot ("on start") to serve this backend: its model
# server (started by start_server.sh from MODEL_COMMAND, its output in MODEL_LOG), then the worker.
# The first boot has no project yet: fetch start_server.sh and pipe it to bash, which fetches the
# project (from VASTWORKER_TARBALL or VASTWORKER_REPO) into $WORKSPACE/vastworker; later boots run
# the start_server.sh that is there.  Set VASTWORKER_SCRIPT_URL to your copy's start_server.sh.
set -euo pipefail

BACKEND="comfyui"
PROJECT="${WORKSPACE:-/home/workspace}/vastworker"
export MODEL_LOG="${MODEL_LOG:-${WORKSPACE:-/home/workspace}/model.log}"

# The model server: $MODEL_COMMAND when set; else ComfyUI from $COMFYUI_DIR, when it is there.
if [ -z "${MODEL_COMMAND:-}" ] && [ -n "${COMFYUI_DIR:-}" ] && [ -f "$COMFYUI_DIR/main.py" ]; then
    MODEL_COMMAND="cd $(printf "%q" "$COMFYUI_DIR") && exec python3 main.py --listen 127.0.0.1 --port 8188"
    export MODEL_COMMAND MODEL_SERVER_URL="${MODEL_SERVER_URL:-http://127.0.0.1:8188}"
fi

if [ -f "$PROJECT/start_server.sh" ]; then
    bash "$PROJECT/start_server.sh" "$BACKEND"
elif [ -n "${VASTWORKER_SCRIPT_URL:-}" ]; then
    wget -qO- "$VASTWORKER_SCRIPT_URL" | bash -s "$BACKEND"
else
    echo "vastworker: error: set VASTWORKER_SCRIPT_URL to the URL of your copy's start_server.sh" >&2
    exit 1
fi
