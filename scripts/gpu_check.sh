#!/usr/bin/env bash
# The project's checks that need a CUDA GPU, in two stages that each fit one short device call.
#
#   scripts/gpu_check.sh kernels   # kernel tests on CUDA, a tile sweep, kernels.bench fp16 (BF16=1: bf16 too)
#   scripts/gpu_check.sh model     # greedy parity (CUDA graphs, eager, CPU), a server run on CUDA, speculation
#                                  # timings with and without graphs (BF16=1: bf16 parity too)
#   scripts/gpu_check.sh engine    # a shorter model stage: parity of graphs with eager launches, a server
#                                  # run (its start-up captures logged), speculation with the server's
#                                  # defaults, where a step's time goes, batching graphed and eager
#                                  # (~6 minutes, estimated: start-up capture of every bucket is untimed)
#
# Logs go to $OUT (default ./gpu-check-out); each stage prints its tables last. The model stage
# needs the default model in the model cache (`python -m models.fetch`, or its GGUF placed in
# $GORGON_HOME/gguf when the machine has no network) and the server's Python packages.
#
# On a lent machine with no network and 64 MiB per upload (2026-11-27, H200), this worked:
# `split -b 49181216 -d ~/.cache/gorgon/gguf/*.gguf .dev/p` (.dev/ git-ignored locally); the
# kernels call carries .dev/p00 and copies it out of the tree; the model call, on the same
# warm machine, carries .dev/p01 and wheels of fastapi, starlette, pydantic(-core), uvicorn,
# sse-starlette, gguf and their missing needs (.whl/), joins the halves into
# /root/.cache/gorgon/gguf/ and installs the wheels to a --target on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.txt, note a failure, go on
    local name=$1 limit=$2; shift 2
    echo "=== $name: $* ($(date -u +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" || { echo "=== $name FAILED"; status=1; }
    # a failed CUDA graph capture falls back to eager launches: correct, but not what is measured
    grep -q "capture failed" "$OUT/$name.txt" && { echo "=== $name: a CUDA graph capture FAILED"; status=1; }
    return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

case ${1:-} in
kernels)
    step kernel-tests 150 $PY -m pytest tests/kernels -q -p no:cacheprovider -n 8 --timeout 300
    # tile sweep at long context (SWEEP seconds), then the table with the fastest tiles
    step bench-fp16 $((${SWEEP:-150} + 150)) $PY -m kernels.bench --dtype float16 --sweep "${SWEEP:-150}"
    [ -n "${BF16:-}" ] && step bench-bf16 150 $PY -m kernels.bench --dtype bfloat16
    # The engine on CUDA before the real model is there: random weights in the default
    # model's shape (its config and tokenizer files in $RANDOM_MODEL), a smoke test of the path
    if [ -d "${RANDOM_MODEL:-}" ]; then
        $PY -c "import sys, torch, transformers as t; torch.manual_seed(0); t.AutoModelForCausalLM.from_config(
t.AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" "$RANDOM_MODEL"
        step engine-smoke 150 $PY -m benchmarks.parity --model "$RANDOM_MODEL" --prompts 4 --max-tokens 24 \
            --variants cuda/triton/plain,cuda/triton/adaptive,cuda/torch/plain,cpu/torch/plain
    fi
    grep -- "->" "$OUT/bench-fp16.txt"; tail -n 34 "$OUT/bench-fp16.txt"
    [ -f "$OUT/engine-smoke.txt" ] && tail -n 7 "$OUT/engine-smoke.txt"
    ;;
model)
    step fetch 90 $PY -m models.fetch
    # fp32 (no TF32): CUDA graphs against eager launches, Triton against PyTorch, CUDA against the CPU
    step parity-fp32 240 $PY -m benchmarks.parity --save "$OUT/texts.json" --variants \
        cuda/triton/plain/eager,cuda/triton/adaptive/eager,cuda/triton/plain,cuda/triton/adaptive,cuda/torch/plain,cpu/torch/plain
    [ -n "${BF16:-}" ] && step parity-bf16 90 $PY -m benchmarks.parity --dtype bfloat16 --variants \
        cuda/triton/plain,cuda/triton/adaptive,cuda/torch/plain
    $PY -m server --device cuda --port 8000 --log-level info >"$OUT/server.log" 2>&1 &
    server=$!
    step server-check 150 $PY -m benchmarks.server_check --expected "$OUT/texts.json"
    kill -TERM $server; wait $server
    grep -E "graphs|step cost" "$OUT/server.log"
    step speculation 150 $PY -m benchmarks.speculation --sizes 1,4,16,64 --temperatures 0 --prompts 6 \
        --cuda-graphs off,on
    tail -n 10 "$OUT/parity-fp32.txt"; [ -f "$OUT/parity-bf16.txt" ] && tail -n 6 "$OUT/parity-bf16.txt"
    tail -n 7 "$OUT/server-check.txt"; tail -n 12 "$OUT/speculation.txt"
    ;;
engine)
    step fetch 90 $PY -m models.fetch
    step parity-fp32 180 $PY -m benchmarks.parity --save "$OUT/texts.json" --variants \
        cuda/triton/plain/eager,cuda/triton/plain,cuda/triton/adaptive,cuda/triton/adaptive/eager
    $PY -m server --device cuda --port 8000 --log-level info >"$OUT/server.log" 2>&1 &
    server=$!
    step server-check 150 $PY -m benchmarks.server_check --expected "$OUT/texts.json"
    kill -TERM $server; wait $server
    grep -E "graphs|step cost" "$OUT/server.log"
    step speculation 120 $PY -m benchmarks.speculation --sizes 1,4,16 --temperatures 0 --prompts 6
    # where a step's time goes (graphed forward, drafting, host work), alone and 16 at a time
    step step-parts 90 $PY -m benchmarks.step_parts --sizes 1,4,16
    step step-parts-16 90 $PY -m benchmarks.step_parts --sizes 1,4 --concurrency 16 --prompts 32
    step batching 240 $PY -m benchmarks.batching --concurrency 1,4,16,32 --max-tokens 64 --fixed-tree 16 \
        --cuda-graphs on,off
    tail -n 6 "$OUT/parity-fp32.txt"; tail -n 7 "$OUT/server-check.txt"; tail -n 6 "$OUT/speculation.txt"
    tail -n 6 "$OUT/step-parts.txt"; tail -n 5 "$OUT/step-parts-16.txt"; tail -n 14 "$OUT/batching.txt"
    ;;
*)
    echo "usage: $0 kernels|model|engine" >&2; exit 2 ;;
esac
exit $status
