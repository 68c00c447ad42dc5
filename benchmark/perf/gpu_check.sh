#!/usr/bin/env bash
# The GPU checks in one job of about 8 minutes on one GPU: seed 0 of the headline study on the GPU
# (its 11 runs side by side on the card; the whole study is 3 seeds), the throughput of the suite against a
# plain loop (and with 4 optimiser steps per training_step), eager, compiled and in bf16, 8 runs of the MLP VAE
# as members against the same 8 one by one, then where training still waits on the GPU. Its timeouts add up
# to 520 s. Expects, in .device/
# (not tracked): mnist.pkl.gz and cache/ (the domain FID extractor and reference statistics, made on the
# CPU); and wheels in .whl/ for packages the GPU image lacks. Writes everything to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
STUDY_TIMEOUT=${STUDY_TIMEOUT:-180}; EPOCHS=${EPOCHS:-20}; PER_DEVICE=${PER_DEVICE:-11}; SEEDS=${SEEDS:-0}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 LATENT_BENCH_CACHE=$PWD/.device/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
timeout "$STUDY_TIMEOUT" python3 -m benchmark.cli run "${STUDY:-configs/studies/seed_question_mnist.yaml}" \
  --seeds "$SEEDS" --devices auto \
  --per-device "$PER_DEVICE" --wandb disabled --results "$OUT/results" --work-dir /tmp/gpu-runs \
  --set trainer.accelerator=auto --set data.path=.device/mnist.pkl.gz --set "trainer.max_epochs=$EPOCHS" \
  --set evaluation.iw_samples=1000 --set evaluation.expost_epochs=5 \
  2>&1 | grep -v -i warn | tee "$OUT/study.log"
echo "study wall time: $(( $(date +%s) - start )) s (seeds $SEEDS, epochs $EPOCHS, $PER_DEVICE runs per GPU)" | tee -a "$OUT/study.log"
tar czf "$OUT/results.tgz" -C "$OUT" results 2>/dev/null && rm -rf "$OUT/results"
tar czf "$OUT/worker-logs.tgz" --exclude='*.ckpt' --exclude='wandb' -C /tmp/gpu-runs . 2>/dev/null
# the suite, a plain loop and 4 optimiser steps per training_step (Lightning's per-step loop paid once for 4)
timeout "${PERF_TIMEOUT:-120}" python3 -m benchmark.perf.throughput --data .device/mnist.pkl.gz --epochs 3 --rounds 2 \
  --train-size 10240 --models vae-mlp,ae-mlp,vae-conv,ae-conv --steps-per-call 4 2>&1 \
  | grep -v -i "warn\|LOCAL_RANK\|available\|stopped\|tip" | tee "$OUT/throughput.txt"
# torch.compile and bf16 autocast, on the MLP VAE: both loops, the same budget as above
for opt in --compile "--precision bf16-mixed"; do
  timeout "${OPT_TIMEOUT:-50}" python3 -m benchmark.perf.throughput --data .device/mnist.pkl.gz --epochs 3 --rounds 2 \
    --train-size 10000 --models vae-mlp $opt 2>&1 | grep -v -i "warn\|LOCAL_RANK\|available\|stopped\|tip" \
    | tee -a "$OUT/throughput_options.txt"
done
# 8 runs (seeds) of the MLP VAE on binarised MNIST as one batched model, against the same runs one by one, and how
# far each member ends from its run on the GPU (its generator, cuBLAS's batched rounding)
timeout "${MEMBERS_TIMEOUT:-90}" python3 -m benchmark.perf.members_speed --data mnist_binary \
  --data-path .device/mnist.pkl.gz --accelerator gpu --variants vae --members 8 --epochs 1 2>&1 \
  | grep "^|" | tee "$OUT/members.txt"
# where a training epoch still waits on the GPU (torch's sync debug mode, grouped by the calling line)
timeout "${SYNC_TIMEOUT:-30}" python3 -m benchmark.perf.throughput --data .device/mnist.pkl.gz --train-size 10000 \
  --models vae-mlp,ae-mlp --host-syncs 2>&1 | grep -v -i "warn\|LOCAL_RANK\|available\|stopped\|tip" | tee "$OUT/host_syncs.txt"
