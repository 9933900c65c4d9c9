#!/bin/bash
# Stage what tests/device/run.sh needs on a lent GPU machine, here, before the call: the
# benchmark and the runtime's kernel and whole-model tests as dev-profile binaries (the dev
# profile optimizes the runtime, and the shared target dir already holds it; a release build
# would start cold), stripped and xz-compressed into .devbin/, and the Vulkan loader package
# into .gl/. With BASE=<commit>, the benchmark is also built at that commit (in a git worktree
# beside the shared target dir) as .devbin/device_bench_base.xz, for run.sh's A/B in one call.
# Run from the repository root; then:
#   run(command="BENCH_ARGS=... bash tests/device/run.sh", carry=[".devbin", ".gl"])
set -euo pipefail
: "${CARGO_TARGET_DIR:=$HOME/.cache/ostquant/target}"
export CARGO_TARGET_DIR
rm -rf .devbin && mkdir -p .devbin .gl
cargo build -p ostquant-tests --example device_bench
cargo test -p ostquant-tests --test runtime_linear --test runtime_ops --test runtime_model --no-run
pack() { # pack SOURCE NAME
    cp "$1" ".devbin/$2" && strip ".devbin/$2" && xz -f ".devbin/$2"
}
pack "$CARGO_TARGET_DIR/debug/examples/device_bench" device_bench
for t in runtime_linear runtime_ops runtime_model; do
    # The test binary just built: the newest of its hashed names.
    newest=$(ls -t "$CARGO_TARGET_DIR"/debug/deps/$t-* | grep -v '\.d$' | head -1)
    pack "$newest" "$t"
done
if [ -n "${BASE:-}" ]; then
    tree="$(dirname "$CARGO_TARGET_DIR")/base-worktree"
    git worktree remove --force "$tree" 2>/dev/null || true
    git worktree add --detach "$tree" "$BASE"
    (cd "$tree" && cargo build -p ostquant-tests --example device_bench)
    pack "$CARGO_TARGET_DIR/debug/examples/device_bench" device_bench_base
    git worktree remove --force "$tree"
    # The shared target dir now holds the base's benchmark: rebuild this tree's.
    cargo build -p ostquant-tests --example device_bench
fi
ls .gl/*.deb >/dev/null 2>&1 || (cd .gl && apt-get download libvulkan1)
du -sh .devbin .gl
