#!/usr/bin/env bash
# Run every CUDA path of ddpm.py once and measure it beside the original script, in one call.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine: at most 9 minutes (GPU_CHECK_SECONDS)
#   bash benchmarks/gpu_check.sh --quick    # dry run on a CPU: tiny sizes, the same steps
#
# Every figure is a JSON line in gpu_check.jsonl (in $OUT when it is set, else a temporary folder);
# the logs of each part sit beside it. The decisive figures come first, since a cold compile takes
# 85-90 s on an H200; no part starts once GPU_CHECK_SECONDS (default 510) have passed, and each is
# cut at what is left. The steps, in order:
#   0. training under CUDA graphs (--compile-mode reduce-overhead) against the default compile mode,
#      at batch 64 and 256, beside the original's timing script (.shared/bench/seed_baseline.py, or
#      $SEED_BASELINE); then the layouts at batch 256: channels_last, NCHW, NCHW with inductor's layout
#      optimisation forced on;
#   1. benchmarks/bench.py (default model: every sampler, compiled sampling, a profile);
#   2. the command line end to end: --train on a generated image folder with compile, previews,
#      checkpoints and post-hoc EMA snapshots; --loadckpt ... --num-samples 100 --compile --ema-length 0.08
#      (CUDA graphs, padded last batch, a rebuilt EMA);
#      --resume (eager);
#   3. --precision fp16 (GradScaler) and --precision fp32 for a few steps each;
#   4. the 8 GB promise: the default model at batch 64 under an 8 GiB memory cap, bf16 and fp16,
#      compile on and off, with peak memory;
#   5. torchrun --standalone --nproc_per_node 1 (NCCL on CUDA, gloo on a CPU);
#   6. the out-of-memory retry: batch 256 with --grad-accum 1 under an 8 GiB cap;
#   7. the command line under CUDA graphs (--compile-mode reduce-overhead): --grad-accum 2, SIGTERM once
#      steps are logged (finish the step, save, exit 0), --resume under graphs again, and the
#      out-of-memory retry under graphs.
# GPU_CHECK_ONLY="memory torchrun" runs only those parts (graphs layout bench cli precision memory torchrun oom
# graphs_cli);
# MEMORY_COMPILE_MODES="off" leaves out the compiled runs of part 4.
set -u
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUTDIR"
W=$(mktemp -d)
LOG=$OUTDIR/gpu_check.jsonl
CLI=$OUTDIR/cli.log
BASELINE=${SEED_BASELINE:-.shared/bench/seed_baseline.py}
ONLY=${GPU_CHECK_ONLY:-all}
LIMIT=${GPU_CHECK_SECONDS:-510}
START=$(date +%s)
export PYTHONUNBUFFERED=1
: > "$LOG"

left() { echo $((LIMIT - ($(date +%s) - START))); }
# want PART: the part was asked for, and there is time left to start it
want() {
  if [ "$(left)" -le 10 ]; then
    echo "{\"what\": \"step\", \"name\": \"$1\", \"rc\": -1, \"note\": \"not started: the time is up\"}" | tee -a "$LOG"
    return 1
  fi
  [ "$ONLY" = all ] || [[ " $ONLY " == *" $1 "* ]]
}
echo "gpu_check: figures in $LOG, work folder $W"

# step NAME SECONDS LOGFILE CMD...: run CMD with a time limit, append its output to LOGFILE and
# its JSON lines to the figures, then one JSON line with the exit status and the seconds
step() {
  local name=$1 limit=$2 logf=$3
  shift 3
  local t0 cap
  t0=$(date +%s.%N)
  cap=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  [ "$limit" -lt 1 ] && limit=1
  echo "=== $name: $*" >> "$logf"
  timeout "$limit" "$@" > "$W/step.out" 2>&1
  local rc=$?
  cat "$W/step.out" >> "$logf"
  grep '^{' "$W/step.out" >> "$LOG"
  record "$name" "$rc" "$t0"
  return $rc
}

# record NAME RC T0 [KEY VALUE]...: one JSON line for a finished part, its exit status, its seconds since
# T0 and any further text fields
record() {
  "$PY" -c "import json,sys; a = sys.argv; print(json.dumps({'what': 'step', 'name': a[1], 'rc': int(a[2]),
    'seconds': round(float(a[4]) - float(a[3]), 1), **dict(zip(a[5::2], a[6::2]))}))" \
    "$1" "$2" "$3" "$(date +%s.%N)" "${@:4}" | tee -a "$LOG"
}

# summary NAME CKPT_DIR: the last checkpoint's step and the last logged loss, as a JSON line
summary() {
  "$PY" - "$1" "$2" <<'EOF' | tee -a "$LOG"
import csv, json, sys
from pathlib import Path
sys.path.insert(0, ".")
import ddpm
name, folder = sys.argv[1], Path(sys.argv[2])
out = {"what": "summary", "name": name}
try:
    path = ddpm.newest_checkpoint(folder)
    obj = ddpm.read_checkpoint(path)
    out.update(checkpoint=path.name, step=obj["step"], precision=obj["train"]["precision"],
               files=sorted(p.name for p in folder.glob("ckpt-*.pth")))
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    out.update(last_loss=float(rows[-1]["loss"]) if rows else None, img_per_s=float(rows[-1]["img_per_s"]) if rows else None)
except Exception as e:  # a failed step leaves nothing to read
    out["error"] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(out))
EOF
}

# oom_retry NAME TAG FLAGS...: train at batch 256 with --grad-accum 1 under an 8 GiB cap, so that the
# first step runs out of memory and the retry halves the micro-batch; then the checkpoint's summary
oom_retry() {
  local name=$1 tag=$2
  shift 2
  step "$name" 150 "$CLI" "$PY" - "$W/faces" "$W/ck-$tag" "$W/out-$tag" "$@" <<'EOF'
import sys
import torch
sys.path.insert(0, ".")
import ddpm
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(8 * 2**30 / total)
rc = ddpm.main(["--train", "--data-folders", sys.argv[1], "--ckpt-save-dir", sys.argv[2], "--save-dir", sys.argv[3],
                "--batch-size", "256", "--grad-accum", "1", "--max-steps", "6", "--seed", "0", "--no-run-pictures",
                "--sample-every", "0", "--log-every", "2", *sys.argv[4:]])
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB under the 8 GiB cap")
sys.exit(rc)
EOF
  summary "$name" "$W/ck-$tag"
}

"$PY" - <<'EOF' | tee -a "$LOG"
import json, platform, torch
d = {"what": "machine", "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
             sms=p.multi_processor_count)
print(json.dumps(d))
EOF

if [ "$QUICK" = 1 ]; then
  DEV=(--device cpu)
  MODEL=(--img-size 16 --num-channels 32 --channel-multiples 1 2 --has-attn f t --num-blocks 1 --timesteps 100)
  N_IMAGES=64; SIZE=16; BATCH=8; STEPS=12; MORE=16; FEW=4; GRAPHS=(); GRAPH_TRAIN=()
  BENCH=(--quick); BASE=(--quick)
else
  DEV=(); MODEL=(); N_IMAGES=2048; SIZE=64; BATCH=64; STEPS=256; MORE=288; FEW=20; GRAPHS=(--compile)
  GRAPH_TRAIN=(--compile --compile-mode reduce-overhead)
  BENCH=(--profile "$OUTDIR/profile.txt"); BASE=()
fi

# 0. the decisive figures: CUDA graphs in training, then the layouts
if [ "$QUICK" = 1 ]; then
  GRAPH_ARGS=(--quick --only train --compile-modes on graphs); LAYOUT_ARGS=(--quick --only train --compile-modes on)
else
  GRAPH_ARGS=(--only train --batches 64 256 --compile-modes on graphs --steps 30 --warmup 5)
  LAYOUT_ARGS=(--only train --batches 256 --compile-modes on --steps 20 --warmup 5)
fi
want graphs && step graphs 260 "$OUTDIR/bench.log" "$PY" benchmarks/bench.py "${GRAPH_ARGS[@]}"
want layout && step layout 200 "$OUTDIR/bench.log" "$PY" benchmarks/bench.py "${LAYOUT_ARGS[@]}" \
  --layouts channels_last nchw nchw-opt

# 1. speed and memory beside the original
if want bench; then
  step bench 300 "$OUTDIR/bench.log" "$PY" benchmarks/bench.py "${BENCH[@]}" --only sample
  if [ "$QUICK" = 1 ]; then  # its autocast("cpu") runs bf16 emulated on a CPU: minutes per sampling step
    echo '{"what": "step", "name": "seed_baseline", "rc": -1, "note": "skipped in --quick"}' | tee -a "$LOG"
  elif [ -f "$BASELINE" ]; then
    step seed_baseline 200 "$OUTDIR/bench.log" "$PY" "$BASELINE" "${BASE[@]}"
  else
    echo "{\"what\": \"step\", \"name\": \"seed_baseline\", \"rc\": -1, \"note\": \"$BASELINE not found\"}" | tee -a "$LOG"
  fi
fi

# 2. the command line end to end, on a generated folder of PNG faces
"$PY" - "$W/faces" "$N_IMAGES" "$SIZE" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
import ddpm
out, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i, img in enumerate(ddpm.demo_faces(n, size)):
    ddpm.save_png(img, out / f"face-{i:05d}.png")
EOF
TRAIN=(ddpm.py --train --data-folders "$W/faces" "${DEV[@]}" "${MODEL[@]}" --batch-size "$BATCH" --seed 0)
if want cli; then
  export TORCH_LOGS=graph_breaks,recompiles
  step cli_train 200 "$CLI" "$PY" "${TRAIN[@]}" --ckpt-save-dir "$W/ckpt" --save-dir "$W/out" --epochs 100 \
    --max-steps "$STEPS" --sample-every $((STEPS / 2)) --log-every $((STEPS / 8)) --posthoc-ema --posthoc-snapshots 4
  summary cli_train "$W/ckpt"
  step cli_sample 150 "$CLI" "$PY" ddpm.py --loadckpt "$W/ckpt" "${DEV[@]}" --num-samples 100 --batch-size 64 \
    "${GRAPHS[@]}" --save-dir "$W/samples" --seed 1 --ema-length 0.08
  ls "$W/samples" | grep -c '^ddpm-[0-9]*\.png$' | "$PY" -c "import json,sys; print(json.dumps({'what': 'summary',
    'name': 'cli_sample', 'pngs': int(sys.stdin.read())}))" | tee -a "$LOG"
  step cli_resume 150 "$CLI" "$PY" "${TRAIN[@]}" --resume --ckpt-save-dir "$W/ckpt" --save-dir "$W/out" \
    --max-steps "$MORE" --no-run-pictures --no-compile
  summary cli_resume "$W/ckpt"
  unset TORCH_LOGS
  cp "$W/samples/ddpm-all.png" "$W/out/final-grid.png" "$OUTDIR/" 2>/dev/null
fi

# 3. the other precisions
want precision && for prec in fp16 fp32; do
  step "precision_$prec" 120 "$CLI" "$PY" "${TRAIN[@]}" --precision "$prec" --no-compile --max-steps "$FEW" \
    --ckpt-save-dir "$W/ck-$prec" --save-dir "$W/out-$prec" --no-run-pictures --sample-every 0 --log-every 5
  summary "precision_$prec" "$W/ck-$prec"
done

# 4. the 8 GB laptop: the default model at batch 64 under an 8 GiB cap
if ! want memory; then
  :
elif [ "$QUICK" = 1 ]; then
  step memory_8gb 120 "$OUTDIR/bench.log" "$PY" benchmarks/bench.py --quick --only train --precisions fp32 bf16 \
    --compile-modes off
else
  step memory_8gb 200 "$OUTDIR/bench.log" "$PY" benchmarks/bench.py --only train --batches 64 \
    --precisions bf16 fp16 --compile-modes ${MEMORY_COMPILE_MODES:-on off} --mem-cap-gib 8 --steps 8 --warmup 2
fi

# 5. torchrun with one process
want torchrun && step torchrun 120 "$CLI" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "${TRAIN[@]}" \
  --no-compile --max-steps "$FEW" --ckpt-save-dir "$W/ck-dist" --save-dir "$W/out-dist" --no-run-pictures \
  --sample-every 0 --log-every 5
want torchrun && summary torchrun "$W/ck-dist"

# 6. the out-of-memory retry: a batch that cannot fit under the cap, split by halving
if [ "$QUICK" = 0 ] && want oom; then
  oom_retry oom_retry oom --no-compile
  grep -h "out of memory" "$CLI" | head -5
fi

# 7. the command line under CUDA graphs: accumulation, a signal, resume, the out-of-memory retry
if want graphs_cli; then
  G=$W/ck-graphs
  GTRAIN=("${TRAIN[@]}" "${GRAPH_TRAIN[@]}" --grad-accum 2 --ckpt-save-dir "$G" --save-dir "$W/out-graphs"
          --no-run-pictures --sample-every 0 --log-every 4)
  # train until 3 rows are logged (past the compile and the graphs' capture), then SIGTERM
  echo "=== graphs_sigterm: ${GTRAIN[*]} --epochs 1000" >> "$CLI"
  t0=$(date +%s.%N)
  "$PY" "${GTRAIN[@]}" --epochs 1000 > "$W/step.out" 2>&1 &
  pid=$!
  until [ "$(grep -c '^[0-9]' "$G/metrics.csv" 2>/dev/null)" -ge 3 ] 2>/dev/null || ! kill -0 $pid 2>/dev/null \
        || [ "$(left)" -le 60 ]; do sleep 1; done
  kill -TERM $pid 2>/dev/null
  (sleep 60; kill -KILL $pid 2>/dev/null) &  # a run that does not stop within a minute counts as a failure
  watchdog=$!
  wait $pid
  rc=$?
  kill $watchdog 2>/dev/null
  cat "$W/step.out" >> "$CLI"
  stopped=$(grep -h 'stopped (' "$W/step.out" | tail -1)
  record graphs_sigterm "$rc" "$t0" expect "rc 0, stopped (SIGTERM)" stopped "$stopped"
  summary graphs_sigterm "$G"
  n=$(echo "$stopped" | grep -o 'at step [0-9]*' | grep -o '[0-9]*')
  step graphs_resume 150 "$CLI" "$PY" "${GTRAIN[@]}" --resume --max-steps $((${n:-$MORE} + 8))
  summary graphs_resume "$G"
  if [ "$QUICK" = 0 ]; then
    oom_retry graphs_oom goom --compile --compile-mode reduce-overhead
  fi
fi
echo "gpu_check: done; figures in $LOG"
