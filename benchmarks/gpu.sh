#!/usr/bin/env bash
# GPU checks in one short run (about 6 minutes expected on one H200; the per-step limits add up to
# 12): the CUDA tests, the latency, dispatch, streaming and roofline benchmarks on the GPU (with
# torch.cuda.max_memory_allocated), bf16 and fp16 training smokes of `m3vit train`, and a 1-process
# NCCL torchrun smoke (DDP steps). Every step writes JSON (or a log) under the output folder, and
# summary.json lists each step's exit status and seconds.
#
#   benchmarks/gpu.sh [--device cuda|cpu] [--out DIR]
#
#   --device cpu  a dry run of the same steps on CPU at toy sizes (gloo instead of NCCL, bf16 only):
#                 checks the script and its Python parts where no GPU is lent; its numbers mean nothing.
#   --out DIR     output folder (default benchmarks/results/gpu-<UTC time>; must not exist yet).
#
# Python: $PYTHON, else .venv/bin/python, else python3; run from the repository root.
# Exit status: 0 all steps passed, 1 a step failed (see summary.json and its log), 2 bad arguments,
# 77 no CUDA device with --device cuda (nothing run; the usual "skipped" status).
set -uo pipefail

DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --out) OUT="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "benchmarks/gpu.sh: unknown argument '$1' (use --device cuda|cpu, --out DIR)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "benchmarks/gpu.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.." || exit 2
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import torch, m3vit' 2>/dev/null; then
    echo "benchmarks/gpu.sh: $PY cannot import torch and m3vit; set PYTHON to the project's interpreter" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing was run." >&2
    echo "  Run it where a GPU is available, or use --device cpu for a dry run of its steps on CPU." >&2
    exit 77
fi

OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
if [ -e "$OUT" ]; then
    echo "benchmarks/gpu.sh: $OUT exists; give a new --out folder (results are never overwritten)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
STEPS="$OUT/steps.tsv"
: > "$STEPS"
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and seconds.
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*"
    local start end rc
    start=$(date +%s%N)
    timeout --kill-after=10 "$((limit * LIMIT_SCALE))" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
    [ "$rc" -eq 0 ] || { FAILED=1; echo "   -> $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"; }
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { print ($end - $start) / 1e9 }")" "$*" >> "$STEPS"
}

if [ "$DEVICE" = cuda ]; then
    LIMIT_SCALE=1
    BACKEND=nccl
    AMPS="bf16 fp16"
    LATENCY=(--sizes micro tiny small --rounds 21 --warmup 3)
    CROSSOVER=(--crossover-widths 192 384 768 --crossover-queues 16 64 256 1024 --repeats 5)
    STREAMING=(--experts 64 --cli-experts 64 --repeats 5)
    ROOFLINE=(--gemm-sizes 4096 8192 --repeats 10)
    TRAIN=(--set train.steps=30 --set train.batch_size=8)
else
    LIMIT_SCALE=5  # a dry run on a CPU (perhaps a busy one): the per-step limits are sized for an H200
    BACKEND=gloo
    AMPS="bf16"
    LATENCY=(--sizes micro --rounds 2 --warmup 1)
    CROSSOVER=(--crossover-widths 64 --crossover-queues 8 32 --repeats 1)
    STREAMING=(--model m3vit_micro --dense-model mvit_micro --experts 4 --cli-experts 4 --img-size 64 64 --repeats 1)
    ROOFLINE=(--model m3vit_micro --img-size 64 64 --gemm-sizes 256 --gemm-repeats 2 --repeats 1)
    TRAIN=(--set train.steps=2 --set train.batch_size=2 --set data.size=[64,64] --set data.train_length=8
           --set data.val_length=2)
fi

"$PY" - "$OUT/environment.json" "$DEVICE" <<'PYEOF' > "$OUT/environment.log" 2>&1
import json, os, platform, sys, torch
info = {"device": sys.argv[2], "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
                bf16_supported=torch.cuda.is_bf16_supported())
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PYEOF

# 1. Tests that need (or behave differently with) a CUDA device: the test files mentioning CUDA, the
#    tests named for it. On CPU they skip; the dry run checks that they are collected and skip cleanly.
CUDA_TEST_FILES=$(grep -rl --include='test_*.py' -i cuda tests | sort)
step cuda_tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" --junitxml="$OUT/cuda_tests.xml" $CUDA_TEST_FILES

# 2. Benchmarks on the device.
step latency 90 "$PY" benchmarks/latency.py --device "$DEVICE" "${LATENCY[@]}" --out "$OUT/latency.json"
step dispatch_crossover 45 "$PY" benchmarks/moe_dispatch.py --crossover --device "$DEVICE" "${CROSSOVER[@]}" \
    --out "$OUT/moe_dispatch_crossover.json"
step streaming_memory 270 "$PY" benchmarks/streaming_memory.py --device "$DEVICE" "${STREAMING[@]}" \
    --workdir "$OUT/streaming-tmp" --out "$OUT/streaming_memory.json"
rm -rf "$OUT/streaming-tmp"
step roofline 45 "$PY" benchmarks/roofline.py --device "$DEVICE" "${ROOFLINE[@]}" --out "$OUT/roofline.json"

# 3. Mixed-precision training smokes: the trainer's own options (train.device, train.amp).
for AMP in $AMPS; do
    step "train_$AMP" 60 "$PY" -m m3vit train --config synthetic/m3vit_tiny --out "$OUT/train-$AMP" \
        --set train.device="$DEVICE" --set train.amp="$AMP" "${TRAIN[@]}" --set train.checkpoint_every=1000 \
        --set train.log_every=1 --set train.progress=false
done

# 4. torchrun, one process, a real process group (NCCL on CUDA): all-reduce + DDP steps.
step torchrun_ddp 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/gpu_smoke.py \
    --backend "$BACKEND" --device "$DEVICE" --amp bf16 --out "$OUT/torchrun_ddp.json"

"$PY" - "$STEPS" "$OUT/summary.json" "$DEVICE" <<'PYEOF'
import json, sys
steps = []
for line in open(sys.argv[1]):
    name, rc, seconds, command = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "exit_status": int(rc), "seconds": round(float(seconds), 1), "command": command})
summary = {"device": sys.argv[3], "ok": all(s["exit_status"] == 0 for s in steps), "steps": steps,
           "total_seconds": round(sum(s["seconds"] for s in steps), 1)}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print("\n| step | exit | seconds |\n|---|---:|---:|")
for s in steps:
    print(f"| {s['step']} | {s['exit_status']} | {s['seconds']} |")
print(f"\n{'all steps passed' if summary['ok'] else 'SOME STEPS FAILED'} in {summary['total_seconds']} s; "
      f"wrote {sys.argv[2]}")
PYEOF
[ "$DEVICE" = cpu ] && echo "(--device cpu: a dry run; its timings are not results)"
exit "$FAILED"
