#!/usr/bin/env bash
# The whole AlignTok pipeline on the embedded synthetic data set, on CPU:
#   stage 0 (train_stand_in.py: a small stand-in for DINOv2) -> tokenizer stages 1, 2, 3 -> latent cache and
#   LightningDiT training -> class-balanced sampling -> evaluation.
# Every line is a plain command that can be run by hand. Rerunning continues (--resume).
# Writes into RUN (default runs/demo): stage*/ and dit/ checkpoints, recon.png,
# samples.png and metrics.json.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${1:-runs/demo}
SCALE=${DEMO_SCALE:-1}   # the tests run the same pipeline with a tiny fraction of the steps
steps() { python -c "print(max(2, int($1 * $SCALE)))"; }
times=""
timed() {   # timed LABEL COMMAND...: runs the command and keeps its wall time for the summary
    local label=$1 begin=$(date +%s) status=0
    shift
    # A step stopped by Ctrl-C or SIGTERM saves and exits 75 (or fails): the demo stops there,
    # never going on with an unfinished stage; rerunning continues it.
    "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "run_demo.sh: '$label' did not finish (exit $status); run the same command again to continue" >&2
        exit "$status"
    fi
    times+="$(printf '%5d s  %s' $(( $(date +%s) - begin )) "$label")"$'\n'
}
start=$(date +%s)

# Small DINOv2-architecture encoder (patch 4, 32 px -> 8x8 tokens) and decoder (x4).
ENCODER="--encoder-depth 4 --encoder-dim 128 --encoder-heads 4 --encoder-patch 4 --encoder-native-size 32"
DECODER="--latent-channels 16 --decoder-width 32 --decoder-multipliers 1 2 2 --decoder-res-blocks 1"
COMMON="--data synthetic --image-size 32 --encoder-size 32 --num-images ${DEMO_IMAGES:-10000} --resume"
# The tokenizer trains without LPIPS and the GAN: their weight files are not here, and 800 steps are too few.
NO_GAN="--perceptual-weight 0 --disc-weight 0"

timed "stage 0" python train_stand_in.py --out "$RUN/stage0" --steps "$(steps 800)" --lr 1e-3 --batch-size 64 \
    $COMMON $ENCODER
timed "stage 1" python train_tokenizer.py --stage 1 --out "$RUN/stage1" --steps "$(steps 800)" --lr 1e-3 \
    --encoder-weights "$RUN/stage0/checkpoint.pt" $COMMON $NO_GAN $DECODER
timed "stage 2" python train_tokenizer.py --stage 2 --out "$RUN/stage2" --steps "$(steps 400)" --lr 3e-4 --encoder-lr 1e-4 \
    --init "$RUN/stage1/checkpoint.pt" $COMMON $NO_GAN
timed "stage 3" python train_tokenizer.py --stage 3 --out "$RUN/stage3" --steps "$(steps 400)" --lr 3e-4 \
    --init "$RUN/stage2/checkpoint.pt" $COMMON $NO_GAN

timed "latent cache + LightningDiT" python train_diffusion.py --tokenizer "$RUN/stage3/checkpoint.pt" --out "$RUN/dit" --steps "$(steps 3000)" \
    --num-images "${DEMO_IMAGES:-10000}" --depth 4 --hidden-size 128 --num-heads 2 --batch-size 32 --lr 1e-3 \
    --ema-decay 0.999 --ema-warmup 10 --sample-every 1000 --ckpt-every 1000 --log-every 100 --resume

timed "sampling" python sample.py --ckpt "$RUN/dit/checkpoint.pt" --out "$RUN/samples.npz" --num-samples "${DEMO_SAMPLES:-500}" \
    --steps 50 --cfg-scale 3.0 --cfg-interval 0.1 --batch-size 50 --device cpu
timed "evaluation" python evaluate.py report --stand-in "$RUN/stage0/checkpoint.pt" --tokenizer "$RUN/stage3/checkpoint.pt" \
    --samples "$RUN/samples.npz" --data synthetic --num-images "${DEMO_EVAL_IMAGES:-1000}" --workers 0 --device cpu \
    --recon-png "$RUN/recon.png" --samples-png "$RUN/samples.png" --out "$RUN/metrics.json"

printf '%s%5d s  the whole demo\n' "$times" $(( $(date +%s) - start )) | tee "$RUN/times.txt"
echo "demo finished: see $RUN/metrics.json, $RUN/recon.png, $RUN/samples.png (wall times in $RUN/times.txt)"
