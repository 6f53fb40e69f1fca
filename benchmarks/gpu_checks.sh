#!/usr/bin/env bash
# What only a GPU can show, in one short run (about 4 minutes on one H100/H200):
#   1. the CUDA tests (tests/test_cuda.py: no host sync in a modulated step, device rule = host
#      rule in float64, fp16's scaler before the regularizer, DDP over NCCL, torchrun killed and resumed,
#      a run moved between the GPU and the CPU, --deterministic runs bit-identical)
#   2. the demo with the defaults (auto: bf16 there), then --precision fp16 and fp32: wall time, accuracy
#   3. bench_step.py on the GPU: the method's cost against weight decay, with the modulation rule
#      on the device (the default there) and on host floats, plain-44 and plain-110, bf16 and fp32
#      at batch 128, and plain-110 bf16 at batch 512 (an earlier modulator against today's, in one
#      process: bench_step.py --against REV, by hand, where the tree is a git checkout)
#   4. bench_precision.py on the host CPU pinned to 2 cores (AMX Xeons: fp32 against bf16)
#   5. bench_step.py with torch.compile (inductor, then CUDA graphs): the method's cost when
#      the model is compiled, plain-44 bf16
# Usage (repository root; OUT: a folder for the results, default ./gpu-checks; PARTS: which
# parts, default all):
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
#   OUT=/tmp/gpu PARTS=1235 bash benchmarks/gpu_checks.sh
# Each part runs on if an earlier one fails; everything printed goes to $OUT/gpu-checks.log.
set -u
OUT=${OUT:-gpu-checks}
PARTS=${PARTS:-12345}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); rm -rf /tmp/gpu-runs
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
exec > >(tee "$OUT/gpu-checks.log") 2>&1

echo "== machine $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0),
'capability', torch.cuda.get_device_capability(0)); print('cpu', torch.backends.cpu.get_cpu_capability())"
grep -m1 "model name" /proc/cpuinfo; nproc

part() { [[ $PARTS == *$1* ]] && echo "== $1. $2"; }

if part 1 "CUDA tests"; then
timeout 300 $PY -m pytest -q -rs -s -p no:cacheprovider tests/test_cuda.py
fi

if part 2 "demo"; then
for precision in auto fp16 fp32; do
    start=$EPOCHREALTIME
    timeout 120 $PY -m orthomod train --config demo --precision "$precision" --out /tmp/gpu-runs \
        --name "demo-$precision" --no-progress
    echo "demo --precision $precision: wall $($PY -c "print(round($EPOCHREALTIME - $start, 1))") s"
done
$PY - "$OUT/demo-summaries.json" <<'EOF'
import json, pathlib, sys
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/gpu-runs").glob("*/summary.json"))}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=2))
EOF
fi

bench() {  # model precision batch [--compile MODE | --against REV]
    local name="bench-step-$1-$2-b$3${5:+-${4#--}-$5}"
    timeout ${TIMEOUT:-150} $PY benchmarks/bench_step.py --device cuda --model "$1" --precision "$2" --batch-size "$3" \
        --configs l2,ortho+mod,ortho+mod-host,ortho --rounds 6 --steps-per-round 5 "${@:4}" \
        > "$OUT/$name.json" && grep -A5 '"median_round_ratio_vs_l2"\|"median_step_s"\|"warm_up_s"' "$OUT/$name.json"
}
if part 3 "step time"; then
for model in plain44 plain110; do for precision in bf16 fp32; do bench $model $precision 128; done; done
bench plain110 bf16 512
fi
if part 4 "the host CPU, pinned to 2 cores as this project's CPU machines have: fp32 against bf16"; then
grep -o -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort | uniq -c
(cd benchmarks && CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout 120 taskset -c 0,1 $PY bench_precision.py \
    --models plain20,plain44,plain110 --rounds 3 > "$OUT/bench-precision-host-cpu.json"; cat "$OUT/bench-precision-host-cpu.json")
fi
if part 5 "step time with torch.compile"; then
for mode in default reduce-overhead; do TIMEOUT=120 bench plain44 bf16 128 --compile $mode; done
fi
echo "== done $(date -u +%FT%TZ)"
