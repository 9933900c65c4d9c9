//! Normalized Hadamard transforms of size n = K·2^m: H_n = (H_K ⊗ H_{2^m}) / √n, with H_{2^m}
//! Sylvester's (natural order, symmetric) and H_K built by Paley's constructions.
//!
//! The base order K is the smallest K = o·2^b (n = o·2^a, o odd, b ≤ a) for which a Paley
//! construction (or Sylvester doubling of one) exists. That covers every size of the LLaMA
//! family (576 = 36·16, 1536 = 12·128, 11008 = 344·32, 14336 = 28·512, 13824 = 108·128, …)
//! and more than the fixed tables of QuaRot (5632 = 44·128, 18944 = 148·128). Any Hadamard
//! matrix works for rotations as long as both sides use the same one; these are deterministic.

use crate::error::{Error, Result};

/// A Hadamard transform of size n = k·2^m: the ±1 base matrix of order k and the power of two.
#[derive(Debug, Clone)]
pub struct Hadamard {
    pub n: usize,
    pub k: usize,
    /// Row-major ±1 entries of H_K (k·k).
    base: Vec<i8>,
}

impl Hadamard {
    pub fn new(n: usize) -> Result<Self> {
        let (k, base) = base_for(n).ok_or_else(|| {
            Error::other(format!(
                "no Hadamard transform of size {n}: it must be K·2^m with a Paley-constructible order K (a multiple of 4, or 1 or 2)"
            ))
        })?;
        Ok(Hadamard { n, k, base })
    }

    /// y = H x for each length-n row of `x` (in place): view the row as a k × (n/k) matrix,
    /// Walsh–Hadamard transform each row of it, left-multiply by H_K, scale by 1/√n.
    pub fn apply_rows(&self, x: &mut [f64]) {
        let (n, k) = (self.n, self.k);
        let p = n / k;
        let scale = 1.0 / (n as f64).sqrt();
        let mut tmp = vec![0f64; n];
        for row in x.chunks_mut(n) {
            for r in row.chunks_mut(p) {
                fwht(r);
            }
            if k > 1 {
                tmp.iter_mut().for_each(|t| *t = 0.0);
                for i in 0..k {
                    for j in 0..k {
                        let h = self.base[i * k + j] as f64;
                        let (dst, src) = (&mut tmp[i * p..(i + 1) * p], &row[j * p..(j + 1) * p]);
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += h * s);
                    }
                }
                row.copy_from_slice(&tmp);
            }
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }

    /// The ±1 base matrix H_K, row-major k × k.
    pub fn base_matrix(&self) -> &[i8] {
        &self.base
    }

    /// f32 version of [`apply_rows`](Self::apply_rows).
    pub fn apply_rows_f32(&self, x: &mut [f32]) {
        let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        self.apply_rows(&mut v);
        x.iter_mut().zip(v).for_each(|(a, b)| *a = b as f32);
    }

    /// The dense normalized matrix H (n × n, row-major), for fusion and tests.
    pub fn matrix(&self) -> Vec<f64> {
        // Row i of H is H·e_i transposed; H is applied to rows, so build Hᵀ from unit rows.
        let n = self.n;
        let mut m = vec![0f64; n * n];
        for i in 0..n {
            m[i * n + i] = 1.0;
        }
        self.apply_rows(&mut m); // row i now holds (H e_i)ᵀ = column i of H
        transpose(&m, n)
    }
}

pub(crate) fn transpose(m: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = m[i * n + j];
        }
    }
    t
}

/// In-place unnormalized fast Walsh–Hadamard transform (Sylvester order) of a power-of-two slice.
pub fn fwht(x: &mut [f64]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// The smallest constructible base order K for n, with its matrix.
fn base_for(n: usize) -> Option<(usize, Vec<i8>)> {
    if n == 0 {
        return None;
    }
    let tz = n.trailing_zeros();
    let odd = n >> tz;
    if odd == 1 {
        return Some((1, vec![1]));
    }
    (2..=tz)
        .map(|b| odd << b)
        .find_map(|k| hadamard_matrix(k).map(|h| (k, h)))
}

/// A ±1 Hadamard matrix of order k (row-major), when one of the constructions applies.
pub fn hadamard_matrix(k: usize) -> Option<Vec<i8>> {
    match k {
        1 => return Some(vec![1]),
        2 => return Some(vec![1, 1, 1, -1]),
        _ if !k.is_multiple_of(4) => return None,
        _ => {}
    }
    if let Some(q) = prime_power(k - 1).filter(|q| q.q % 4 == 3) {
        return Some(paley1(&Field::new(q)?));
    }
    if let Some(q) = prime_power(k / 2 - 1).filter(|q| q.q % 4 == 1) {
        return Some(paley2(&Field::new(q)?));
    }
    hadamard_matrix(k / 2).map(|h| sylvester_double(&h, k / 2))
}

fn sylvester_double(h: &[i8], k: usize) -> Vec<i8> {
    let n = 2 * k;
    let mut out = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let sign = if i >= k && j >= k { -1 } else { 1 };
            out[i * n + j] = sign * h[(i % k) * k + j % k];
        }
    }
    out
}

/// Paley I (q ≡ 3 mod 4), order q + 1: H = I + S with S = [[0, 1ᵀ], [−1, Q]] and Q the
/// Jacobsthal matrix Q[a][b] = χ(a − b).
fn paley1(f: &Field) -> Vec<i8> {
    let q = f.q;
    let n = q + 1;
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => f.chi(f.sub(i - 1, j - 1)),
            };
            h[i * n + j] = s + (i == j) as i8;
        }
    }
    h
}

/// Paley II (q ≡ 1 mod 4), order 2(q + 1): the symmetric conference matrix
/// C = [[0, 1ᵀ], [1, Q]] with each 0 replaced by [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]].
fn paley2(f: &Field) -> Vec<i8> {
    let q = f.q;
    let m = q + 1;
    let n = 2 * m;
    let mut h = vec![0i8; n * n];
    for i in 0..m {
        for j in 0..m {
            let c = match (i, j) {
                (0, 0) => 0,
                (0, _) | (_, 0) => 1,
                _ => f.chi(f.sub(i - 1, j - 1)),
            };
            let block: [[i8; 2]; 2] = if c == 0 {
                [[1, -1], [-1, -1]]
            } else {
                [[c, c], [c, -c]]
            };
            for (a, row) in block.iter().enumerate() {
                for (b, v) in row.iter().enumerate() {
                    h[(2 * i + a) * n + 2 * j + b] = *v;
                }
            }
        }
    }
    h
}

#[derive(Debug, Clone, Copy)]
struct PrimePower {
    p: usize,
    k: u32,
    q: usize,
}

fn prime_power(q: usize) -> Option<PrimePower> {
    if q < 2 {
        return None;
    }
    let p = (2..=q).find(|d| q.is_multiple_of(*d))?;
    let mut r = q;
    let mut k = 0;
    while r.is_multiple_of(p) {
        r /= p;
        k += 1;
    }
    (r == 1).then_some(PrimePower { p, k, q })
}

/// GF(p^k) for k ≤ 3: elements are integers whose base-p digits are polynomial coefficients.
struct Field {
    p: usize,
    k: u32,
    q: usize,
    /// χ(x): 0 for zero, 1 for a nonzero square, −1 otherwise.
    chi: Vec<i8>,
}

impl Field {
    fn new(pp: PrimePower) -> Option<Self> {
        if pp.k > 3 {
            return None;
        }
        let PrimePower { p, k, q } = pp;
        // A monic polynomial of degree k ≤ 3 with no root in GF(p) is irreducible.
        let modulus: Vec<usize> = if k == 1 {
            vec![0, 1]
        } else {
            (0..p.pow(k))
                .map(|c| {
                    let mut coeffs: Vec<usize> = (0..k).map(|i| c / p.pow(i) % p).collect();
                    coeffs.push(1);
                    coeffs
                })
                .find(|poly| {
                    (0..p).all(|x| poly.iter().rev().fold(0, |acc, &a| (acc * x + a) % p) != 0)
                })?
        };
        let digits = |x: usize| (0..k).map(|i| x / p.pow(i) % p).collect::<Vec<_>>();
        let mul = |a: usize, b: usize| -> usize {
            let (da, db) = (digits(a), digits(b));
            let mut prod = vec![0usize; 2 * k as usize];
            for (i, x) in da.iter().enumerate() {
                for (j, y) in db.iter().enumerate() {
                    prod[i + j] = (prod[i + j] + x * y) % p;
                }
            }
            // Reduce by the monic modulus from the top degree down.
            for deg in (k as usize..prod.len()).rev() {
                let c = prod[deg];
                if c != 0 {
                    for (i, m) in modulus.iter().enumerate() {
                        let idx = deg - k as usize + i;
                        prod[idx] = (prod[idx] + p * p - c * m % p) % p;
                    }
                }
            }
            (0..k as usize).map(|i| prod[i] * p.pow(i as u32)).sum()
        };
        let mut chi = vec![-1i8; q];
        chi[0] = 0;
        for y in 1..q {
            chi[mul(y, y)] = 1;
        }
        Some(Field { p, k, q, chi })
    }

    fn sub(&self, a: usize, b: usize) -> usize {
        let mut out = 0;
        let mut place = 1;
        let (mut a, mut b) = (a, b);
        for _ in 0..self.k {
            let d = (a % self.p + self.p - b % self.p) % self.p;
            out += d * place;
            place *= self.p;
            a /= self.p;
            b /= self.p;
        }
        out
    }

    fn chi(&self, x: usize) -> i8 {
        self.chi[x]
    }
}

/// A random Hadamard rotation R = D_s·Hᵀ (signs s uniform from `seed`), dense n × n row-major,
/// used as x' = x·R.
pub fn random_hadamard(n: usize, seed: u64) -> Result<Vec<f64>> {
    use rand::{Rng, SeedableRng};
    let h = Hadamard::new(n)?;
    let ht = transpose(&h.matrix(), n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = ht;
    for i in 0..n {
        let s = if rng.random::<bool>() { 1.0 } else { -1.0 };
        r[i * n..(i + 1) * n].iter_mut().for_each(|v| *v *= s);
    }
    Ok(r)
}

/// The row transform x ↦ H·x of every row of a device tensor [rows, n], factored as
/// H = (H_K ⊗ H_P)/√n: a P×P matmul on each length-P segment, then a K×K matmul across the
/// segments. That is n·(K + P) multiply-adds per row instead of the dense n², which matters for
/// the online down_proj Hadamard (1536 = 12·128: 140 instead of 1536 per element).
#[derive(Clone)]
pub struct RowHadamard {
    n: usize,
    k: usize,
    /// H_Kᵀ [K, K] (None when K = 1), unnormalized.
    hk_t: Option<burn::tensor::Tensor<2>>,
    /// H_P [P, P] (Sylvester, symmetric), unnormalized.
    hp: burn::tensor::Tensor<2>,
}

impl RowHadamard {
    pub fn new(n: usize, device: &burn::tensor::Device) -> Result<Self> {
        use burn::tensor::{Tensor, TensorData};
        let h = Hadamard::new(n)?;
        let (k, p) = (h.k, n / h.k);
        let hp: Vec<f32> = (0..p * p)
            .map(|ij| {
                let (i, j) = (ij / p, ij % p);
                if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let hk_t = (k > 1).then(|| {
            let t: Vec<f32> = (0..k * k)
                .map(|ij| h.base[(ij % k) * k + ij / k] as f32)
                .collect();
            Tensor::from_data(TensorData::new(t, [k, k]), device)
        });
        Ok(RowHadamard {
            n,
            k,
            hk_t,
            hp: Tensor::from_data(TensorData::new(hp, [p, p]), device),
        })
    }

    /// H·x for each row of `x` [rows, n]; differentiable (matmuls and reshapes only).
    pub fn apply(&self, x: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
        let [rows, n] = x.dims();
        assert_eq!(n, self.n, "Hadamard size");
        let (k, p) = (self.k, n / self.k);
        // Segment j of a row holds X[j, :]; X·H_P transforms each segment (H_P symmetric).
        let y = x.reshape([rows * k, p]).matmul(self.hp.clone());
        let y = match &self.hk_t {
            // (H_K·X)ᵀ = Xᵀ·H_Kᵀ, with the segment index moved last.
            Some(hk_t) => y
                .reshape([rows, k, p])
                .swap_dims(1, 2)
                .reshape([rows * p, k])
                .matmul(hk_t.clone())
                .reshape([rows, p, k])
                .swap_dims(1, 2)
                .reshape([rows, n]),
            None => y.reshape([rows, n]),
        };
        y.mul_scalar(1.0 / (n as f64).sqrt())
    }
}
