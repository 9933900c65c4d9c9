#!/bin/bash
# The device check run on a lent GPU machine (results/bench-h100.md): the runtime's kernel and
# whole-model tests on the real GPU, then the benchmark. Run from the repository root, with the
# release binaries xz-compressed in .devbin/ (git-ignored) and the loader packages in .gl/:
#   cargo build --release -p ostquant-tests --example device_bench \
#       --test runtime_linear --test runtime_ops --test runtime_model
#   (copy each binary to .devbin/<name without hash>, strip, xz)
# BENCH_ARGS: device_bench's arguments; BENCH_S: its time limit in seconds.
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
ldconfig -p | grep -q libvulkan || echo "no libvulkan"
# Headless machines: the driver's GLX library finds no display and gives the loader no
# vkCreateInstance; its EGL library is the same Vulkan driver without one.
if ldconfig -p | grep -q libEGL_nvidia.so.0; then
    echo '{"file_format_version":"1.0.1","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.3.0"}}' > /tmp/nvidia_egl_icd.json
    export VK_ICD_FILENAMES=/tmp/nvidia_egl_icd.json
fi
cd .devbin && for f in *.xz; do xz -d $f; done; chmod +x device_bench runtime_*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv
export OSTQUANT_TEST_DEVICE=gpu
s=$SECONDS
timeout -k 5 60 ./runtime_linear --test-threads 1 > $OUT/runtime_linear.txt 2>&1; echo "runtime_linear rc=$? $((SECONDS-s)) s"; tail -4 $OUT/runtime_linear.txt
s=$SECONDS
timeout -k 5 ${BENCH_S:-300} ./device_bench ${BENCH_ARGS:-all 32 100 gpu 512,2048} > $OUT/bench.txt 2>&1; echo "bench rc=$? $((SECONDS-s)) s"
s=$SECONDS
timeout -k 5 60 ./runtime_model --test-threads 2 > $OUT/runtime_model.txt 2>&1; echo "runtime_model rc=$? $((SECONDS-s)) s"; tail -4 $OUT/runtime_model.txt
s=$SECONDS
timeout -k 5 40 ./runtime_ops --test-threads 1 > $OUT/runtime_ops.txt 2>&1; echo "runtime_ops rc=$? $((SECONDS-s)) s"; tail -6 $OUT/runtime_ops.txt
cat $OUT/bench.txt
