#!/usr/bin/env bash
# Every GPU check in one call of the device tool (about 7 minutes on an H200), from the repository root:
#   here:  benchmarks/gpu_wheels.sh            (MONAI, nibabel, SimpleITK as wheels in .whl/)
#   there: bash benchmarks/gpu_all.sh 2>&1 | tee $OUT/gpu_all.log   (device tool: carry [".whl"], timeout_s 600)
# Writes $OUT/gpu_all.json (training pipeline vs bare step, loss overhead, the networks against nnU-Net's,
# inference end to end, the demo).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_gpu_env.sh
. benchmarks/_gpu_env.sh
# Each step gets its own limit, cut to what is left of the whole call's (GPU_ALL_BUDGET seconds, the device call's
# 600 less a margin), so that the summary at the end always runs; a step with under 20 s left is skipped.
budget="${GPU_ALL_BUDGET:-570}"
step() {
  local name="$1" limit="$2" left; shift 2
  left=$((budget - SECONDS - 10))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped, ${left} s left"; return; fi
  echo "== $name (limit ${limit} s, ${SECONDS} s in)"
  timeout "$limit" "$@" || echo "(failed or timed out: $?)"
}
step "training: full pipeline vs bare step (eager and compiled)" 280 python3 -m benchmarks.gpu_train --out "$dest/gpu_train.json" --iters 40 --warmup 10 --epoch-iters 250 --val-iters 50
step "inference end to end, 192x224x192, vs the network alone" 110 python3 -m benchmarks.infer_e2e --case synthetic --device cuda --repeat 2
step "inference of 6 cases: preprocessing processes vs one after the other" 90 python3 -m benchmarks.infer_dataset --device cuda --cases 6
# the demo through segpipe's own trainer and predictor on CUDA (called from Python: the image's typer is not the pinned one)
step "the demo on the GPU" 120 python3 -c "from segpipe.demo import run_demo, summary; print(summary(run_demo('/tmp/demo_gpu', device='cuda')))"
# last: the least changed since the 2026-11-28 run
step "boundary-loss overhead in a step, 2x2x96^3" 60 python3 -m benchmarks.loss_overhead --device cuda
step "segpipe's networks vs nnU-Net's own (plain, residual encoder), 2x2x128^3, bf16" 60 python3 -m benchmarks.nnunet_network --device cuda --patch 128 --stages 6 --repeat 10
python3 - "$dest" <<'PY'
import json, pathlib, sys
dest = pathlib.Path(sys.argv[1]); res = pathlib.Path("benchmarks/results")
out = {}
for name in ("gpu_train", "loss_overhead_cuda", "nnunet_network_cuda", "infer_e2e_synthetic_cuda", "infer_dataset_cuda"):
    for folder in (dest, res):
        p = folder / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text()); break
demo = pathlib.Path("/tmp/demo_gpu/evaluation.json")
if demo.is_file():
    out["demo_evaluation"] = json.loads(demo.read_text())["mean"]
metrics = pathlib.Path("/tmp/demo_gpu/run/metrics.csv")
if metrics.is_file():
    (dest / "demo_metrics.csv").write_text(metrics.read_text())
(dest / "gpu_all.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=1)[:3000])
PY
