#!/bin/bash
# The device check run on a lent GPU machine (results/bench-h100.md): the runtime's kernel and
# whole-model tests on the real GPU, then the benchmark. Run from the repository root, with the
# binaries xz-compressed in .devbin/ (git-ignored) and the loader package in .gl/, both staged
# by tests/device/prepare.sh (BASE=<commit> for an A/B), and the call carrying them:
# run(command=..., carry=[".devbin", ".gl"]).
# BENCH_ARGS: device_bench's arguments; BENCH_S: its time limit in seconds. An A/B of two
# code states in one call: with .devbin/device_bench_base.xz (prepare.sh's BASE) that
# benchmark runs first, with the same arguments, into bench_base.txt.
# TRUSTED_ARGS: device_bench's arguments for one more run with OSTQUANT_TRUSTED_SHADERS=1 (the
# kernels without naga's loop bounds, division guards and index clamps), into
# bench_trusted.txt, after the plain one.
source tests/device/vulkan.sh
cd .devbin && for f in *.xz; do xz -d $f; done; chmod +x device_bench* runtime_*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv
export OSTQUANT_TEST_DEVICE=gpu
s=$SECONDS
timeout -k 5 60 ./runtime_linear --test-threads 1 > $OUT/runtime_linear.txt 2>&1; echo "runtime_linear rc=$? $((SECONDS-s)) s"; tail -4 $OUT/runtime_linear.txt
if [ -f device_bench_base ]; then
    s=$SECONDS
    timeout -k 5 ${BENCH_S:-300} ./device_bench_base ${BENCH_ARGS:-all 32 100 gpu 512,2048} > $OUT/bench_base.txt 2>&1; echo "bench_base rc=$? $((SECONDS-s)) s"
fi
s=$SECONDS
timeout -k 5 ${BENCH_S:-300} ./device_bench ${BENCH_ARGS:-all 32 100 gpu 512,2048} > $OUT/bench.txt 2>&1; echo "bench rc=$? $((SECONDS-s)) s"
if [ -n "$TRUSTED_ARGS" ]; then
    s=$SECONDS
    OSTQUANT_TRUSTED_SHADERS=1 timeout -k 5 ${BENCH_S:-300} ./device_bench $TRUSTED_ARGS > $OUT/bench_trusted.txt 2>&1; echo "bench_trusted rc=$? $((SECONDS-s)) s"
fi
s=$SECONDS
timeout -k 5 60 ./runtime_model --test-threads 2 > $OUT/runtime_model.txt 2>&1; echo "runtime_model rc=$? $((SECONDS-s)) s"; tail -4 $OUT/runtime_model.txt
s=$SECONDS
timeout -k 5 40 ./runtime_ops --test-threads 1 > $OUT/runtime_ops.txt 2>&1; echo "runtime_ops rc=$? $((SECONDS-s)) s"; tail -6 $OUT/runtime_ops.txt
cat $OUT/bench.txt
