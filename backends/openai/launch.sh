#!/usr/bin/env bash
# launch.sh: what a Vast instance runs at every boot ("on start") to serve this backend: its model
# server (started by start_server.sh from MODEL_COMMAND, its output in MODEL_LOG), then the worker.
# The first boot has no project yet: fetch start_server.sh and pipe it to bash, which fetches the
# project (from VASTWORKER_TARBALL or VASTWORKER_REPO) into $WORKSPACE/vastworker; later boots run
# the start_server.sh that is there.  Set VASTWORKER_SCRIPT_URL to your copy's start_server.sh.
set -euo pipefail

BACKEND="openai"
PROJECT="${WORKSPACE:-/home/workspace}/vastworker"
export MODEL_LOG="${MODEL_LOG:-${WORKSPACE:-/home/workspace}/model.log}"

# The model server: $MODEL_COMMAND when set; else vLLM serving $MODEL_NAME, when both are here.
# (llama.cpp: MODEL_COMMAND="llama-server -m model.gguf --port 8000"; Ollama: MODEL_COMMAND="ollama
# serve", MODEL_SERVER_URL=http://127.0.0.1:11434, MODEL_HEALTH_ENDPOINT=http://127.0.0.1:11434/api/version)
if [ -z "${MODEL_COMMAND:-}" ] && [ -n "${MODEL_NAME:-}" ] && command -v vllm >/dev/null 2>&1; then
    MODEL_COMMAND="vllm serve $(printf "%q" "$MODEL_NAME") --host 127.0.0.1 --port 8000"
    export MODEL_COMMAND MODEL_SERVER_URL="${MODEL_SERVER_URL:-http://127.0.0.1:8000}"
fi

if [ -f "$PROJECT/start_server.sh" ]; then
    bash "$PROJECT/start_server.sh" "$BACKEND"
elif [ -n "${VASTWORKER_SCRIPT_URL:-}" ]; then
    wget -qO- "$VASTWORKER_SCRIPT_URL" | bash -s "$BACKEND"
else
    echo "vastworker: error: set VASTWORKER_SCRIPT_URL to the URL of your copy's start_server.sh" >&2
    exit 1
fi
