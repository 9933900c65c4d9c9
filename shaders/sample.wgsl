// The next token from the logits, on the GPU (only 4 bytes go back to the host): greedy
// (argmax, the lowest index among equal maxima) when `greedy` is set, else top-p sampling at
// temperature `temperature` with the uniform number `u` drawn on the host:
//   p_i = exp((l_i − max)/T); the nucleus is the smallest set of most probable tokens whose
//   mass reaches top_p·Σp, i.e. {i : p_i ≥ τ} for the largest τ with Σ_{p_i ≥ τ} p_i ≥ top_p·Σp,
//   found by bisection on τ ∈ [0, 1] (p_max = 1); the token is the one whose interval contains
//   u·(nucleus mass) when the nucleus is laid out in index order — the host Sampler's rule.
//
// Layout: logits f32 [vocab]; out u32 [1]. Workgroup plan: one workgroup of 256 threads; thread
// t owns the contiguous indices [t·chunk, (t+1)·chunk); every reduction (max, sums) goes through
// shared memory; the final pick is an exclusive scan of the threads' nucleus masses, then the
// thread whose range holds the target walks its own chunk.

struct Params {
    vocab: u32,
    greedy: u32,
    temperature: f32,
    top_p: f32,
    u: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;
var<workgroup> idx: array<u32, 256>;

fn reduce_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            red[t] = red[t] + red[t + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) t: u32) {
    let chunk = (p.vocab + WG - 1u) / WG;
    let lo = min(t * chunk, p.vocab);
    let hi = min(lo + chunk, p.vocab);
    // Max and its lowest index.
    var best = -3.4e38;
    var best_i = 0xFFFFFFFFu;
    for (var i = lo; i < hi; i = i + 1u) {
        if (logits[i] > best) {
            best = logits[i];
            best_i = i;
        }
    }
    red[t] = best;
    idx[t] = best_i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            let a = red[t];
            let b = red[t + s];
            if (b > a || (b == a && idx[t + s] < idx[t])) {
                red[t] = b;
                idx[t] = idx[t + s];
            }
        }
        workgroupBarrier();
    }
    let m = red[0];
    let argmax = idx[0];
    workgroupBarrier();
    if (p.greedy != 0u) {
        if (t == 0u) {
            out[0] = argmax;
        }
        return;
    }
    // Total mass, then the nucleus threshold by bisection.
    var own = 0.0;
    for (var i = lo; i < hi; i = i + 1u) {
        own = own + exp((logits[i] - m) / p.temperature);
    }
    let wanted = p.top_p * reduce_sum(t, own);
    var tau_lo = 0.0; // Σ_{p ≥ tau_lo} ≥ wanted always (it is the whole mass)
    var tau_hi = 1.0 + 1e-6; // nothing reaches it
    for (var it = 0u; it < 30u; it = it + 1u) {
        let mid = 0.5 * (tau_lo + tau_hi);
        var mass = 0.0;
        for (var i = lo; i < hi; i = i + 1u) {
            let q = exp((logits[i] - m) / p.temperature);
            if (q >= mid) {
                mass = mass + q;
            }
        }
        if (reduce_sum(t, mass) >= wanted) {
            tau_lo = mid;
        } else {
            tau_hi = mid;
        }
    }
    // The nucleus in index order: each thread's mass, an exclusive scan, then the pick.
    var kept = 0.0;
    for (var i = lo; i < hi; i = i + 1u) {
        let q = exp((logits[i] - m) / p.temperature);
        if (q >= tau_lo) {
            kept = kept + q;
        }
    }
    red[t] = kept;
    workgroupBarrier();
    if (t == 0u) {
        var run = 0.0;
        for (var j = 0u; j < WG; j = j + 1u) {
            let v = red[j];
            red[j] = run;
            run = run + v;
        }
        // The target, then the last thread with nucleus mass (a fallback for rounding).
        red[0] = run * p.u;
        out[0] = argmax;
    }
    storageBarrier();
    workgroupBarrier();
    let goal = red[0];
    workgroupBarrier();
    // Thread t's exclusive prefix is red[t] for t > 0 (red[0] now holds the goal; its own
    // prefix is 0).
    var before = 0.0;
    if (t > 0u) {
        before = red[t];
    }
    if (kept > 0.0 && goal >= before && goal < before + kept) {
        var run = before;
        var pick = 0xFFFFFFFFu;
        for (var i = lo; i < hi; i = i + 1u) {
            let q = exp((logits[i] - m) / p.temperature);
            if (q >= tau_lo) {
                pick = i;
                run = run + q;
                if (run > goal) {
                    break;
                }
            }
        }
        out[0] = pick;
    }
}
