//! The CPU runtime's kernels: matrix-vector products straight from the packed int4 (or f16)
//! weights, and the small per-token operations, each the same formula as its WGSL twin in
//! shaders/ so that both runtimes compute the same model.
//!
//! The products are memory-bound on a CPU too: the weights stream from RAM once per token
//! and are never expanded to f32 in memory. On x86-64 with AVX2 + FMA + F16C (checked at run
//! time) eight codes are unpacked per instruction (broadcast, variable shift, mask, convert);
//! elsewhere a portable loop does the same work.

use rayon::prelude::*;

use crate::runtime::host::HostLinear;

/// y = W·x. Rows are split over rayon's threads in blocks large enough to amortise the split.
pub fn gemv(w: &HostLinear, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), w.cols(), "gemv: x does not match the matrix");
    assert_eq!(y.len(), w.rows(), "gemv: y does not match the matrix");
    let block = 64;
    match w {
        HostLinear::Int4 {
            cols,
            spec,
            words,
            scales,
            zeros,
            ..
        } => {
            let group = spec.group.unwrap_or(*cols);
            let groups = cols / group;
            // Σx per group: the zero point and qmin enter as offset·Σx.
            let xsum: Vec<f32> = x.chunks_exact(group).map(|g| g.iter().sum()).collect();
            let qmin = spec.qmin();
            let wpr = cols / 8;
            y.par_chunks_mut(block).enumerate().for_each(|(b, ys)| {
                for (i, yv) in ys.iter_mut().enumerate() {
                    let r = b * block + i;
                    let row = &words[r * wpr..(r + 1) * wpr];
                    let mut acc = 0f32;
                    for g in 0..groups {
                        let wg = &row[g * group / 8..(g + 1) * group / 8];
                        let d = dot_int4(wg, &x[g * group..(g + 1) * group]);
                        let offset = qmin - zeros.as_ref().map_or(0.0, |z| z[r * groups + g]);
                        acc += scales[r * groups + g] * (d + offset * xsum[g]);
                    }
                    *yv = acc;
                }
            });
        }
        HostLinear::Half { cols, halves, .. } => {
            y.par_chunks_mut(block).enumerate().for_each(|(b, ys)| {
                for (i, yv) in ys.iter_mut().enumerate() {
                    let r = b * block + i;
                    *yv = dot_f16(&halves[r * cols..(r + 1) * cols], x);
                }
            });
        }
    }
}

/// The instruction set the products use on this CPU.
pub fn instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        return "AVX2 + FMA + F16C";
    }
    "portable loops"
}

/// Y [tokens, cols → rows] = X·Wᵀ for `tokens` rows of X at once (prefill): each weight row is
/// unpacked once per block of 8 tokens instead of once per token; rows split over threads.
pub fn gemm(w: &HostLinear, x: &[f32], tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), tokens * cols, "gemm: x does not match the matrix");
    assert_eq!(y.len(), tokens * rows, "gemm: y does not match the matrix");
    // Row-major [rows, tokens] first (each thread owns whole rows), then transposed.
    let mut yt = vec![0f32; rows * tokens];
    let block = 16;
    match w {
        HostLinear::Int4 {
            spec,
            words,
            scales,
            zeros,
            ..
        } => {
            let group = spec.group.unwrap_or(cols);
            let groups = cols / group;
            let xsum: Vec<f32> = x.chunks_exact(group).map(|g| g.iter().sum()).collect();
            let qmin = spec.qmin();
            let wpr = cols / 8;
            yt.par_chunks_mut(block * tokens)
                .enumerate()
                .for_each(|(b, out)| {
                    for (i, yr) in out.chunks_mut(tokens).enumerate() {
                        let r = b * block + i;
                        let row = &words[r * wpr..(r + 1) * wpr];
                        for t0 in (0..tokens).step_by(8) {
                            let nt = (tokens - t0).min(8);
                            for g in 0..groups {
                                let wg = &row[g * group / 8..(g + 1) * group / 8];
                                let xs: Vec<&[f32]> = (t0..t0 + nt)
                                    .map(|t| &x[t * cols + g * group..t * cols + (g + 1) * group])
                                    .collect();
                                let d = dot_int4_many(wg, &xs);
                                let offset =
                                    qmin - zeros.as_ref().map_or(0.0, |z| z[r * groups + g]);
                                let s = scales[r * groups + g];
                                for (k, dk) in d.iter().take(nt).enumerate() {
                                    let t = t0 + k;
                                    yr[t] += s * (dk + offset * xsum[t * groups + g]);
                                }
                            }
                        }
                    }
                });
        }
        HostLinear::Half { halves, .. } => {
            yt.par_chunks_mut(block * tokens)
                .enumerate()
                .for_each(|(b, out)| {
                    for (i, yr) in out.chunks_mut(tokens).enumerate() {
                        let r = b * block + i;
                        let row = &halves[r * cols..(r + 1) * cols];
                        for (t, yv) in yr.iter_mut().enumerate() {
                            *yv = dot_f16(row, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                });
        }
    }
    for r in 0..rows {
        for t in 0..tokens {
            y[t * rows + r] = yt[r * tokens + t];
        }
    }
}

/// Σ_j code_j·x_k[j] for each of up to 8 vectors x_k at once (see [`dot_int4`]): the codes are
/// unpacked once for all of them.
pub fn dot_int4_many(words: &[u32], xs: &[&[f32]]) -> [f32; 8] {
    assert!(xs.len() <= 8 && xs.iter().all(|x| x.len() == words.len() * 8));
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the lengths match.
        return unsafe { x86::dot_int4_many(words, xs) };
    }
    let mut out = [0f32; 8];
    for (k, x) in xs.iter().enumerate() {
        out[k] = dot_int4_portable(words, x);
    }
    out
}

/// Σ_j code_j·x_j over packed words (8 codes per word, code j of a word in bits 4j..4j+3);
/// `x` has 8 values per word.
pub fn dot_int4(words: &[u32], x: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), words.len() * 8);
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the lengths match.
        return unsafe { x86::dot_int4(words, x) };
    }
    dot_int4_portable(words, x)
}

/// [`dot_int4`] without SIMD intrinsics.
pub fn dot_int4_portable(words: &[u32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (&w, xs) in words.iter().zip(x.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ((w >> (4 * j)) & 0xF) as f32 * xs[j];
        }
    }
    acc.iter().sum()
}

/// Σ_j h_j·x_j with h f16 bit patterns.
pub fn dot_f16(h: &[u16], x: &[f32]) -> f32 {
    debug_assert_eq!(h.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() && h.len().is_multiple_of(8) {
        // SAFETY: as in `dot_int4`.
        return unsafe { x86::dot_f16(h, x) };
    }
    dot_f16_portable(h, x)
}

/// [`dot_f16`] without SIMD intrinsics.
pub fn dot_f16_portable(h: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (hs, xs) in h.chunks(8).zip(x.chunks(8)) {
        for (j, (&a, &b)) in hs.iter().zip(xs).enumerate() {
            acc[j] += half::f16::from_bits(a).to_f32() * b;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn has_avx2() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Each word is broadcast to 8 lanes and shifted by 0, 4, …, 28: lane j holds code j.
    /// Four accumulators keep four FMAs in flight.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_int4(words: &[u32], x: &[f32]) -> f32 {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(0xF);
        let codes = |w: u32| {
            _mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                mask,
            ))
        };
        let xp = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let n4 = words.len() / 4 * 4;
        let mut i = 0;
        while i < n4 {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: word i + k < words.len(), so its 8 x values are in bounds.
                let xv = unsafe { _mm256_loadu_ps(xp.add(8 * (i + k))) };
                *a = _mm256_fmadd_ps(codes(words[i + k]), xv, *a);
            }
            i += 4;
        }
        while i < words.len() {
            // SAFETY: as above.
            let xv = unsafe { _mm256_loadu_ps(xp.add(8 * i)) };
            acc[0] = _mm256_fmadd_ps(codes(words[i]), xv, acc[0]);
            i += 1;
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }

    /// One broadcast/shift/mask/convert per word, then one FMA per vector.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_int4_many(words: &[u32], xs: &[&[f32]]) -> [f32; 8] {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(0xF);
        let mut acc = [_mm256_setzero_ps(); 8];
        let n = xs.len();
        for (i, &w) in words.iter().enumerate() {
            let c = _mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                mask,
            ));
            for k in 0..n {
                // SAFETY: every x has 8 values per word (checked by the caller).
                let xv = unsafe { _mm256_loadu_ps(xs[k].as_ptr().add(8 * i)) };
                acc[k] = _mm256_fmadd_ps(c, xv, acc[k]);
            }
        }
        let mut out = [0f32; 8];
        for k in 0..n {
            out[k] = hsum(acc[k]);
        }
        out
    }

    /// Eight halves converted per instruction (F16C), four accumulators.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(h: &[u16], x: &[f32]) -> f32 {
        let (hp, xp) = (h.as_ptr(), x.as_ptr());
        let n = h.len() / 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        let load = |i: usize| {
            // SAFETY: i < n, so 8 halves and 8 floats at 8i are in bounds (len = 8n).
            unsafe {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(8 * i) as *const __m128i));
                (w, _mm256_loadu_ps(xp.add(8 * i)))
            }
        };
        let mut i = 0;
        while i + 4 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let (w, xv) = load(i + k);
                *a = _mm256_fmadd_ps(w, xv, *a);
            }
            i += 4;
        }
        while i < n {
            let (w, xv) = load(i);
            acc[0] = _mm256_fmadd_ps(w, xv, acc[0]);
            i += 1;
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }
}

/// RMSNorm: y = x / √(mean(x²) + eps) · w.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * inv * w;
    }
}

/// Rotary embedding, Hugging Face's half-split layout, every head of `x` [heads, hd].
pub fn rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (u, v) = (a[i], b[i]);
            a[i] = u * cos[i] - v * sin[i];
            b[i] = v * cos[i] + u * sin[i];
        }
    }
}

/// The per-group asymmetric quantizer of activations and the KV cache: range [min(x, 0),
/// max(x, 0)], s = max(max − min, 1e-6)/qmax, z = round(−min/s) (ties to even, as WGSL and
/// burn round): (scale, zero).
pub fn asym_range(x: &[f32], qmax: f32) -> (f32, f32) {
    let (mn, mx) = x
        .iter()
        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    let scale = (mx - mn).max(1e-6) / qmax;
    (scale, (-mn / scale).round_ties_even())
}

/// The code of `v` under (scale, zero).
pub fn asym_code(v: f32, scale: f32, zero: f32, qmax: f32) -> f32 {
    ((v / scale).round_ties_even() + zero).clamp(0.0, qmax)
}

/// Dynamic activation fake quantization in place, per group of `group` values.
pub fn act_quant(x: &mut [f32], group: usize, bits: u32) {
    let qmax = ((1u32 << bits) - 1) as f32;
    for g in x.chunks_exact_mut(group) {
        let (scale, zero) = asym_range(g, qmax);
        for v in g.iter_mut() {
            *v = (asym_code(*v, scale, zero, qmax) - zero) * scale;
        }
    }
}

/// SiLU(gate)·up into `out`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}
