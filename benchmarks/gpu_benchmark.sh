#!/usr/bin/env bash
# Every speed benchmark on one GPU, in bf16: the XL/2 peer ratio, XL/2 sampling at 1, 2 and 4 steps
# with the SD-VAE decode (eager and CUDA graph), the R1/R2 precision check, the CAFM step and its attention
# kernels under forward-mode AD, short FSDP2 runs of the AFM and CAFM trainers with their memory peaks,
# and the XL/2 and B/2 training step with compile on/off and checkpointing on/off. Planned to finish in
# under 9 minutes on one H200.
#
#   bash benchmarks/gpu_benchmark.sh [RESULTS_DIR]      # default: $OUT if set, else gpu-benchmark/
#
# It installs nothing but the project's own dependency diffusers, and only when it is missing and its
# wheel was carried in .whl/ (docs/performance.md); the project runs from src/ through PYTHONPATH.
# Prints the three tables last and writes JSON and logs to RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu-benchmark}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# One inductor cache for all configurations: the second compile of the same block is a cache hit.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/afm-inductor-cache}

if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/afm-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/afm-site:$PYTHONPATH"
  else
    echo "error: diffusers cannot be imported and no wheel was carried in .whl/ (see docs/performance.md)" >&2
    exit 1
  fi
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt"
"$PY" -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$RESULTS/gpu.txt"

start=$SECONDS
step() {  # step NAME COMMAND...: run, log, and say how long it took
  local name=$1; shift
  local t0=$SECONDS
  "$@" 2>&1 | tee "$RESULTS/$name.log"
  echo "[$name: $((SECONDS - t0)) s, $((SECONDS - start)) s in all]"
}

step compare_dit "$PY" benchmarks/compare_dit.py --device cuda --size XL/2 --batch_size 32 --dtype bf16 \
  --repeats 10 --json "$RESULTS/compare_dit.json"
step sampling "$PY" benchmarks/sampling.py --device cuda --size XL/2 --sample_size 32 --batch_size 64 --dtype bf16 \
  --steps 1 2 4 --cuda_graph --repeats 10 --json "$RESULTS/sampling.json"
# The approximated R1/R2 under bf16, with and without the full-precision split, and its cost (TF32 as the reference).
step penalty_precision "$PY" benchmarks/penalty_precision.py --device cuda --allow_tf32 --batch_size 32 \
  --time_size XL/2 --time_batch_size 32 --repeats 5 --json "$RESULTS/penalty_precision.json"
# XL/2 first and, per size, the configurations in order of importance: whatever would start after
# the time left (500 s from the start, so the whole script stays under 9 minutes) is skipped, not cut.
# Continuous AFM: which SDPA kernels have forward-mode AD on this GPU, and a CAFM iteration against an AFM one (B/2).
step cafm_step "$PY" benchmarks/cafm_step.py --device cuda --sizes B/2 --batch_size 32 --sample_size 32 --dtype bf16 \
  --repeats 5 --json "$RESULTS/cafm_step.json"
# Text-to-image CAFM at Z-Image's full width (3840, 2 of its 30 layers), 512 px, bf16, with and without checkpointing.
step cafm_zimage_step "$PY" benchmarks/cafm_zimage_step.py --device cuda --dim 3840 --n_layers 2 --resolution 512 \
  --batch_size 1 --dtype bf16 --repeats 3 --json "$RESULTS/cafm_zimage_step.json"
# FSDP2 on one GPU (Accelerate selects FSDP on CUDA): an XL/2 AFM run and a CAFM run (a SiT-XL/2-sized flow
# model from 10 flow-matching steps) on the digits upsampled to 32 px (256 tokens, as ImageNet latents), bf16,
# checkpointed, batch 32; the trainers log their CUDA memory peak, to hold against docs/training.md's plan.
FSDP=(accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 1)
RUN=(--dataset_name digits --resolution 32 --vae none --train_batch_size 32 --mixed_precision bf16
     --gradient_checkpointing --report_to none --validation_steps 1000 --checkpointing_steps 1000)
step fsdp_afm "${FSDP[@]}" examples/train_afm.py --model_config XL/2 --max_train_steps 10 "${RUN[@]}" \
  --output_dir /tmp/fsdp-afm
step fsdp_flow "${FSDP[@]}" examples/train_flow_matching.py --model_config XL/2 --max_train_steps 10 "${RUN[@]}" \
  --output_dir /tmp/fsdp-flow
step fsdp_cafm "${FSDP[@]}" examples/train_cafm.py --pretrained_model_name_or_path /tmp/fsdp-flow --max_train_steps 10 \
  --warmup_steps 5 --num_discriminator_steps 1 "${RUN[@]}" --output_dir /tmp/fsdp-cafm
grep -h "peak GPU memory" "$RESULTS"/fsdp_*.log
step train_step "$PY" benchmarks/train_step.py --device cuda --sizes XL/2 B/2 --batch_size 32 --sample_size 32 \
  --configs bf16/none/off bf16/blocks/off bf16/blocks/on bf16/none/on \
  --steps 10 --warmup 2 --timeout 240 --budget $((500 - (SECONDS - start))) --json "$RESULTS/train_step.json"

echo
echo "== tables ($((SECONDS - start)) s) =="
for name in compare_dit sampling penalty_precision cafm_step cafm_zimage_step train_step; do
  echo "-- $name"
  # the last table of each log, with the line above it (the settings), and compare_dit's ratio line
  awk '/^\|/ { if (!intable) { block = prev "\n"; intable = 1 } block = block $0 "\n"; next }
       { if (intable) { last = block; intable = 0 } prev = $0 }
       /^ratio / { ratio = $0 }
       END { if (intable) last = block; printf "%s", last; if (ratio) print ratio }' "$RESULTS/$name.log"
done
