#!/usr/bin/env bash
# start_server.sh: bring a vastworker up on this machine, and keep it to one worker.
#
#   start_server.sh BACKEND [WORKER OPTIONS...]       start BACKEND (a name under backends/, or a
#                                                      path to a directory with backend.py),
#                                                      stopping the worker this script started
#                                                      before, if any
#   start_server.sh --stop                             stop the worker this script started
#   wget -qO- URL/start_server.sh | bash -s BACKEND    the same, on a machine without the project
#
# Environment:
#   WORKSPACE            where vastworker.log, vastworker.pid and (when fetched) the project in
#                        vastworker/ live; default /home/workspace on a Vast instance (CONTAINER_ID
#                        is set), else ~/.local/state/vastworker.  The worker runs there, so
#                        relative paths in its options (--state-file state.json) are in WORKSPACE
#   VASTWORKER_TARBALL   a .tar.gz URL of the project (fetched with wget or curl), or
#   VASTWORKER_REPO      anything `git clone` accepts; used when this script is not run from a
#                        checkout and $WORKSPACE/vastworker does not exist yet
#   VASTWORKER_UPDATE=1  fetch $WORKSPACE/vastworker again even though it is there; so does the
#                        flag file VASTWORKER_UPDATE_FLAG (default /.force_update), which the
#                        worker's POST /pyworker/update creates; it is removed once fetched
#   VASTWORKER_WAIT      seconds to wait for the worker to serve (or load); default 60
#   VASTWORKER_WAIT_FOR  serving (default): return once the worker answers, saying whether its
#                        model is still loading; loaded: wait for the model too (exit 1 if it
#                        fails).  Its phase stays in $WORKSPACE/vastworker.ready: "PID PHASE"
#   MODEL_COMMAND        a command that starts the backend's model server, e.g.
#                        "vllm serve Qwen/Qwen3-8B --host 127.0.0.1 --port 8000": run detached,
#                        its output appended to MODEL_LOG (default $WORKSPACE/model.log), which
#                        the worker watches.  One started before that still runs is kept (a
#                        model takes minutes to load); --stop stops it too
# The worker inherits this environment (WORKER_PORT/AUTH_PORT, CONTAINER_ID, MASTER_TOKEN,
# REPORT_ADDR, ...).  When REPORT_ADDR is set, a failed start is reported to the autoscaler's
# /worker_status/ so that the instance does not sit in "loading" for ever.
set -euo pipefail

MIN_PYTHON="3.8"
STAGING=""
SCRIPT_SOURCE="${BASH_SOURCE[0]:-}"  # empty when piped to bash (inside a function it says "main")
UPDATE_FLAG="${VASTWORKER_UPDATE_FLAG:-/.force_update}"

say() {
    printf 'vastworker: %s\n' "$*"
}

fail() {
    # fail MESSAGE: say what is wrong, tell the autoscaler when there is one, exit 1
    printf 'vastworker: error: %s\n' "$1" >&2
    report_error "$1"
    exit 1
}

cleanup() {
    if [ -n "$STAGING" ]; then
        rm -rf "$STAGING"
    fi
}

json_string() {
    # json_string TEXT: TEXT as a JSON string literal
    local text="$1"
    text="${text//\\/\\\\}"
    text="${text//\"/\\\"}"
    text="${text//$'\n'/\\n}"
    text="${text//$'\r'/\\r}"
    text="${text//$'\t'/\\t}"
    text="$(printf '%s' "$text" | tr -d '\000-\037')"
    printf '"%s"' "$text"
}

post_json() {
    # post_json URL BODY: one POST with a short timeout; fails when nothing can send it
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 5 -H 'Content-Type: application/json' --data-binary "$2" "$1" \
            -o /dev/null </dev/null 2>/dev/null
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 5 -t 1 -O /dev/null --header='Content-Type: application/json' \
            --post-data="$2" "$1" </dev/null 2>/dev/null
    else
        return 1
    fi
}

report_error() {
    # report_error MESSAGE: post the status record with error_msg to the first REPORT_ADDR that
    # takes it (3 rounds); never fails, since it runs while failing already
    local id="${CONTAINER_ID:-}" body address addresses attempt
    if [ -z "${REPORT_ADDR:-}" ]; then
        return 0
    fi
    if ! [[ "$id" =~ ^[0-9]+$ ]]; then
        id="$(json_string "$id")"
    fi
    body="{\"id\": $id, \"mtoken\": $(json_string "${MASTER_TOKEN:-}"), \"version\": \"\","
    body+=" \"loadtime\": 0.0, \"cur_load\": 0.0, \"rej_load\": 0.0, \"new_load\": 0.0,"
    body+=" \"error_msg\": $(json_string "vastworker failed to start: $1"), \"max_perf\": 0.0,"
    body+=" \"cur_perf\": 0.0, \"cur_capacity\": 0, \"max_capacity\": 0, \"num_requests_working\": 0,"
    body+=" \"num_requests_recieved\": 0, \"additional_disk_usage\": 0.0, \"working_request_idxs\": [],"
    body+=" \"url\": \"\"}"
    IFS=',' read -ra addresses <<<"$REPORT_ADDR"
    for attempt in 1 2 3; do
        for address in "${addresses[@]}"; do
            address="${address// /}"
            if [ -n "$address" ] && post_json "${address%/}/worker_status/" "$body"; then
                say "reported the error to ${address%/}/worker_status/"
                return 0
            fi
        done
        if [ "$attempt" -lt 3 ]; then
            sleep 1
        fi
    done
    say "could not report the error to $REPORT_ADDR"
}

check_python() {
    local version
    if ! command -v python3 >/dev/null 2>&1; then
        fail "python3 is not installed; vastworker needs Python $MIN_PYTHON or newer (e.g. apt-get install -y python3)"
    fi
    if ! version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' </dev/null 2>&1)"; then
        fail "python3 does not run: $version"
    fi
    if ! python3 -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$MIN_PYTHON'.split('.'))))" </dev/null; then
        fail "python3 is Python $version; vastworker needs Python $MIN_PYTHON or newer"
    fi
}

download() {
    # download URL FILE
    if command -v wget >/dev/null 2>&1; then
        wget -q -T 20 -t 2 -O "$2" "$1" </dev/null
    elif command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 2 --connect-timeout 20 -o "$2" "$1" </dev/null
    else
        fail "neither wget nor curl is installed to download $1"
    fi
}

fetch_project() {
    # fetch_project DIR: put the project into DIR, replacing what is there only once the new
    # copy is complete
    local target="$1" root=""
    STAGING="$(mktemp -d "$WORKSPACE/.vastworker-fetch.XXXXXX")"
    if [ -n "${VASTWORKER_TARBALL:-}" ]; then
        say "fetching $VASTWORKER_TARBALL"
        download "$VASTWORKER_TARBALL" "$STAGING/project.tar.gz" || fail "could not download $VASTWORKER_TARBALL"
        mkdir "$STAGING/tree"
        tar -xzf "$STAGING/project.tar.gz" -C "$STAGING/tree" </dev/null 2>/dev/null \
            || fail "$VASTWORKER_TARBALL is not a .tar.gz archive"
        for candidate in "$STAGING/tree" "$STAGING"/tree/*; do
            if [ -f "$candidate/vastworker.py" ]; then
                root="$candidate"
                break
            fi
        done
    elif [ -n "${VASTWORKER_REPO:-}" ]; then
        command -v git >/dev/null 2>&1 || fail "git is needed to clone $VASTWORKER_REPO"
        say "cloning $VASTWORKER_REPO"
        git clone --quiet --depth 1 "$VASTWORKER_REPO" "$STAGING/tree" </dev/null 2>/dev/null \
            || git clone --quiet "$VASTWORKER_REPO" "$STAGING/tree" </dev/null \
            || fail "could not clone $VASTWORKER_REPO"
        root="$STAGING/tree"
    else
        fail "vastworker is not in $target; set VASTWORKER_TARBALL (a .tar.gz URL) or VASTWORKER_REPO (a git URL) to where your copy lives"
    fi
    if [ -z "$root" ] || [ ! -f "$root/vastworker.py" ]; then
        fail "no vastworker.py in what was fetched"
    fi
    rm -rf "$target.old"
    if [ -e "$target" ]; then
        mv "$target" "$target.old"
    fi
    mv "$root" "$target"
    rm -rf "$target.old" "$STAGING"
    STAGING=""
}

find_project() {
    # sets PROJECT: the checkout this script file sits in (never the current directory of a
    # piped script), else $WORKSPACE/vastworker, fetched when missing or VASTWORKER_UPDATE=1
    local here="" installed="$WORKSPACE/vastworker"
    if [ -n "$SCRIPT_SOURCE" ] && [ -f "$SCRIPT_SOURCE" ] && [ -f "$(dirname "$SCRIPT_SOURCE")/vastworker.py" ]; then
        here="$(cd "$(dirname "$SCRIPT_SOURCE")" && pwd)"
    fi
    if [ -n "$here" ] && [ "$here" != "$(cd "$installed" 2>/dev/null && pwd)" ]; then
        PROJECT="$here"
        if [ "${VASTWORKER_UPDATE:-0}" = "1" ]; then
            say "VASTWORKER_UPDATE=1 ignored: this script runs from the checkout at $PROJECT"
        fi
        return 0
    fi
    PROJECT="$installed"
    if [ ! -f "$PROJECT/vastworker.py" ] || [ "${VASTWORKER_UPDATE:-0}" = "1" ] || [ -e "$UPDATE_FLAG" ]; then
        fetch_project "$PROJECT"
        rm -f "$UPDATE_FLAG"
    fi
}

available_backends() {
    local found="" directory
    for directory in "$PROJECT"/backends/*/; do
        if [ -f "$directory/backend.py" ]; then
            found+="${found:+, }$(basename "$directory")"
        fi
    done
    printf '%s' "${found:-none}"
}

process_start() {
    # process_start PID: when the process started (clock ticks since boot), or nothing if it is
    # gone or a zombie; with the pid it names one process for good, as pids are reused
    local stat fields
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    read -ra fields <<<"${stat##*) }"
    if [ "${fields[0]}" != "Z" ]; then
        printf '%s' "${fields[19]}"
    fi
}

started_process() {
    # started_process PID_FILE: sets STARTED_PID to the process this script started and named in
    # PID_FILE, if it still runs; fails otherwise
    local pid="" start=""
    STARTED_PID=""
    if [ ! -f "$1" ]; then
        return 1
    fi
    read -r pid start <"$1" || true
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ -n "$start" ] && [ "$(process_start "$pid")" = "$start" ]; then
        STARTED_PID="$pid"
        return 0
    fi
    return 1
}

stop_started() {
    # stop_started PID_FILE WHAT [quiet]: stop WHAT, started by this script (its whole process
    # group: it was started with setsid), saying so either way
    local waited pid
    if ! started_process "$1"; then
        if [ "${3:-}" != "quiet" ]; then
            say "no $2 started by this script is running (pid file: $1)"
        fi
    else
        pid="$STARTED_PID"
        say "stopping the $2 started before (pid $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for waited in $(seq 1 150); do  # 15 s: the worker's grace time and some
            if [ -z "$(process_start "$pid")" ]; then
                break
            fi
            sleep 0.1
        done
        if [ -n "$(process_start "$pid")" ]; then
            say "it is still running after ${waited}0 ms: killing it"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

stop_worker() {
    # stop_worker [quiet]: stop the worker this script started
    stop_started "$PID_FILE" worker "${1:-}"
}

start_model_server() {
    # start_model_server: run $MODEL_COMMAND detached, its output in $MODEL_LOG, unless the model
    # server this script started before still runs
    if [ -z "${MODEL_COMMAND:-}" ]; then
        return 0
    fi
    export MODEL_LOG="${MODEL_LOG:-$WORKSPACE/model.log}"
    if started_process "$MODEL_PID_FILE"; then
        say "the model server started before still runs (pid $STARTED_PID): kept"
        return 0
    fi
    mkdir -p "$(dirname "$MODEL_LOG")" || fail "cannot create the directory of MODEL_LOG $MODEL_LOG"
    say "starting the model server: $MODEL_COMMAND (log: $MODEL_LOG)"
    setsid bash -c "$MODEL_COMMAND" >>"$MODEL_LOG" 2>&1 </dev/null &
    printf '%s %s\n' "$!" "$(process_start "$!")" >"$MODEL_PID_FILE"
}

option_value() {
    # option_value NAME DEFAULT ARGS...: the value of --NAME V or --NAME=V among ARGS
    local name="$1" value="$2"
    shift 2
    while [ "$#" -gt 0 ]; do
        case "$1" in
            "--$name") value="${2:-}"; shift ;;
            "--$name="*) value="${1#*=}" ;;
        esac
        shift
    done
    printf '%s' "$value"
}

worker_phase() {
    # worker_phase PID: the phase the worker PID wrote to the ready file once serving (loading,
    # loaded, error, stopping), and rewrites as it changes; nothing before it serves (a probe of
    # the port could be answered by another program holding it)
    local pid="" phase=""
    if [ -f "$READY_FILE" ] && read -r pid phase <"$READY_FILE" 2>/dev/null && [ "$pid" = "$1" ]; then
        printf '%s' "${phase:-loaded}"
    fi
}

outside_project() {
    # outside_project WHAT PATH: fail when PATH (relative to WORKSPACE) is inside the fetched
    # project, which an update replaces
    local path="$2"
    if [ -z "$path" ] || [ "$PROJECT" != "$WORKSPACE/vastworker" ]; then
        return 0
    fi
    case "$path" in /*) ;; *) path="$WORKSPACE/$path" ;; esac
    case "$(cd "$(dirname "$path")" 2>/dev/null && pwd)/" in
        "$PROJECT"/*) fail "$1 $2 is inside $PROJECT, which an update replaces; keep it in $WORKSPACE" ;;
    esac
}

start_worker() {
    # start_worker BACKEND [OPTIONS...]: start it detached, wait for its first answer
    local backend="$1" port host log_start started elapsed public_port last_line phase wait_for
    shift
    port="$(option_value port "${WORKER_PORT:-${AUTH_PORT:-3000}}" "$@")"
    host="$(option_value host 127.0.0.1 "$@")"
    case "$host" in 0.0.0.0 | "::" | "") host=127.0.0.1 ;; esac
    outside_project --state-file "$(option_value state-file "${STATE_FILE:-}" "$@")"
    outside_project --cache-dir "$(option_value cache-dir "" "$@")"
    log_start=1  # the worker's own lines start after what earlier runs logged
    if [ -f "$LOG_FILE" ]; then
        log_start=$(($(wc -c <"$LOG_FILE") + 1))
    fi
    rm -f "$READY_FILE"
    cd "$WORKSPACE"  # relative paths in the worker's options are in WORKSPACE, not the project
    started="$(date +%s%N)"
    say "starting vastworker $* (log: $LOG_FILE)"
    # setsid: detached from this shell, whose end must not end the worker.  runpy imports the
    # project's vastworker module (its bytecode cached after the first boot, where a script is
    # compiled at every start) ahead of anything in the current directory.  One line, so that ps
    # shows the worker whole; it also names itself vastworker (ps -e, pgrep vastworker)
    PYTHONUNBUFFERED=1 setsid python3 -c 'import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module("vastworker", run_name="__main__", alter_sys=True)' \
        "$PROJECT" "$@" --ready-file "$READY_FILE" >>"$LOG_FILE" 2>&1 </dev/null &
    WORKER_PID=$!
    printf '%s %s\n' "$WORKER_PID" "$(process_start "$WORKER_PID")" >"$PID_FILE"
    wait_for="${VASTWORKER_WAIT_FOR:-serving}"
    case "$wait_for" in serving | loaded) ;; *) fail "VASTWORKER_WAIT_FOR=$wait_for: expected serving or loaded" ;; esac
    while phase="$(worker_phase "$WORKER_PID")"; [ -z "$phase" ] || { [ "$wait_for" = loaded ] && [ "$phase" = loading ]; }; do
        if [ -z "$(process_start "$WORKER_PID")" ]; then
            tail -c "+$log_start" "$LOG_FILE" | tail -n 20 >&2 || true
            rm -f "$PID_FILE"
            last_line="$(tail -c "+$log_start" "$LOG_FILE" | grep -v '^[[:space:]]*$' | tail -n 1 || true)"
            last_line="${last_line#vastworker: error: }"  # the worker's own words, without its prefix
            fail "the worker exited during start-up: ${last_line:-no output}"
        fi
        elapsed=$((($(date +%s%N) - started) / 1000000))
        if [ "$elapsed" -gt $((${VASTWORKER_WAIT:-60} * 1000)) ]; then
            tail -c "+$log_start" "$LOG_FILE" | tail -n 20 >&2 || true
            stop_worker
            fail "the worker was not ${wait_for/serving/serving on $host:$port} within ${VASTWORKER_WAIT:-60} s"
        fi
        sleep 0.02
    done
    elapsed=$((($(date +%s%N) - started) / 1000000))
    case "$phase" in
        loaded) say "$backend is up at http://$host:$port (pid $WORKER_PID, answering after $elapsed ms)" ;;
        loading) say "$backend is serving at http://$host:$port, model loading (pid $WORKER_PID, answering after" \
            "$elapsed ms; its phase is in $READY_FILE and at http://$host:$port/.vastworker/status;" \
            "VASTWORKER_WAIT_FOR=loaded waits for it)" ;;
        *) say "$backend is serving at http://$host:$port, but its phase is $phase: see $LOG_FILE" ;;
    esac
    if [ "$wait_for" = loaded ] && [ "$phase" != loaded ]; then
        fail "the backend did not load: $(grep ' ERROR ' "$LOG_FILE" | tail -n 1 || true)"
    fi
    public_port="VAST_TCP_PORT_$port"
    if [ -n "${PUBLIC_IPADDR:-}" ] && [ -n "${!public_port:-}" ]; then
        say "public address: http://$PUBLIC_IPADDR:${!public_port}"
    fi
}

usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]:-/dev/null}" 2>/dev/null \
        || printf 'usage: start_server.sh BACKEND [WORKER OPTIONS...] | --stop\n'
}

main() {
    local backend="${1:-}"
    if [ -z "${WORKSPACE:-}" ] && [ -n "${CONTAINER_ID:-}" ]; then
        WORKSPACE=/home/workspace  # Vast's
    elif [ -z "${WORKSPACE:-}" ]; then  # not on an instance: a place of this user's own
        WORKSPACE="${XDG_STATE_HOME:-${HOME:?set WORKSPACE or HOME}/.local/state}/vastworker"
        mkdir -p "$WORKSPACE"
    fi
    LOG_FILE="$WORKSPACE/vastworker.log"
    PID_FILE="$WORKSPACE/vastworker.pid"
    MODEL_PID_FILE="$WORKSPACE/model.pid"
    READY_FILE="$WORKSPACE/vastworker.ready"
    trap cleanup EXIT
    case "$backend" in
        -h | --help)
            usage
            return 0
            ;;
        "")
            usage >&2
            printf 'vastworker: error: name a backend, e.g. start_server.sh helloworld\n' >&2
            return 2
            ;;
        --stop)
            stop_worker
            stop_started "$MODEL_PID_FILE" "model server" quiet
            return 0
            ;;
    esac
    shift
    mkdir -p "$WORKSPACE" || fail "cannot create WORKSPACE $WORKSPACE"
    check_python
    find_project
    if [[ "$backend" == */* ]]; then  # a path to a directory with backend.py, as the worker takes
        [ -f "$backend/backend.py" ] || fail "$backend has no backend.py"
        backend="$(cd "$backend" && pwd)"
    elif ! [[ "$backend" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || [ ! -f "$PROJECT/backends/$backend/backend.py" ]; then
        fail "no backend '$backend' in $PROJECT/backends (available: $(available_backends))"
    fi
    stop_worker quiet
    start_model_server
    start_worker "$(basename "$backend")" "$backend" "$@"  # the name for messages, then the worker's arguments
}

main "$@"
