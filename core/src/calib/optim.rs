//! Optimisers of the learned transforms (SPEC §5.2): Riemannian Adam with the Cayley retraction
//! on the Stiefel manifold of square orthogonal matrices (geoopt 0.5.0's update, canonical
//! metric, one second-moment scalar per matrix), Cayley SGD with momentum, and plain Adam for
//! the scale vectors. Everything runs on the host in f64: the matrices are small (d × d and
//! head_dim × head_dim) and the retraction needs a linear solve.

use faer::Mat;
use faer::linalg::solvers::Solve;

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;
/// Re-project onto the manifold (polar factor) every this many steps (geoopt's `stabilize`).
pub const STABILIZE: usize = 10;

/// Which update the rotations get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationOptimizer {
    /// Riemannian Adam (OSTQuant's choice).
    Adam,
    /// Cayley SGD with momentum 0 (SpinQuant's choice).
    Sgd,
}

impl std::str::FromStr for RotationOptimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adam" | "riemannian-adam" => Ok(RotationOptimizer::Adam),
            "sgd" | "cayley-sgd" => Ok(RotationOptimizer::Sgd),
            _ => Err(format!("unknown optimiser '{s}' (expected adam or sgd)")),
        }
    }
}

fn mat(x: &[f64], n: usize) -> Mat<f64> {
    Mat::from_fn(n, n, |i, j| x[i * n + j])
}

fn store(m: &Mat<f64>, out: &mut [f64]) {
    let n = m.nrows();
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = m[(i, j)];
        }
    }
}

/// The state of one orthogonal n × n parameter.
#[derive(Debug, Clone)]
pub struct StiefelState {
    pub n: usize,
    /// First moment (a tangent vector at the current point), row-major.
    pub m: Vec<f64>,
    /// Second moment: one scalar per matrix.
    pub v: f64,
    pub step: usize,
}

impl StiefelState {
    pub fn new(n: usize) -> Self {
        StiefelState {
            n,
            m: vec![0.0; n * n],
            v: 0.0,
            step: 0,
        }
    }

    /// One update of `x` (row-major, orthogonal) with Euclidean gradient `g` at learning rate
    /// `lr`. The direction is Adam's (`RotationOptimizer::Adam`) or the momentum-free gradient
    /// (`Sgd`); both retract with the Cayley transform.
    pub fn step(&mut self, kind: RotationOptimizer, x: &mut [f64], g: &[f64], lr: f64) {
        let n = self.n;
        self.step += 1;
        let xm = mat(x, n);
        let gm = mat(g, n);
        // Riemannian gradient under the canonical metric: r = G − X Gᵀ X.
        let r = &gm - &xm * gm.transpose() * &xm;
        let dir = match kind {
            RotationOptimizer::Adam => {
                let mut m = mat(&self.m, n);
                m = &m * BETA1 + &r * (1.0 - BETA1);
                // <r, r>_X = ‖r‖² − ½‖Xᵀ r‖²
                let xr = xm.transpose() * &r;
                let inner = r.squared_norm_l2() - 0.5 * xr.squared_norm_l2();
                self.v = BETA2 * self.v + (1.0 - BETA2) * inner;
                let t = self.step as i32;
                let m_hat = &m * (1.0 / (1.0 - BETA1.powi(t)));
                let v_hat = self.v / (1.0 - BETA2.powi(t));
                store(&m, &mut self.m);
                m_hat * (1.0 / (v_hat.max(0.0).sqrt() + EPS))
            }
            RotationOptimizer::Sgd => r,
        };
        let u = dir * (-lr);
        // A = u Xᵀ − X uᵀ (skew); C = (I − A/2)⁻¹ (I + A/2); X ← C X, m ← C m.
        let a = &u * xm.transpose() - &xm * u.transpose();
        let eye = Mat::<f64>::identity(n, n);
        let lhs = &eye - &a * 0.5;
        let rhs_op = &eye + &a * 0.5;
        let lu = lhs.partial_piv_lu();
        let mut x_new = lu.solve(&rhs_op * &xm);
        let mut m_new = lu.solve(&rhs_op * mat(&self.m, n));
        if self.step.is_multiple_of(STABILIZE) {
            x_new = polar(&x_new);
            // Project the momentum back onto the tangent space: m − X mᵀ X.
            m_new = &m_new - &x_new * m_new.transpose() * &x_new;
        }
        store(&x_new, x);
        store(&m_new, &mut self.m);
    }
}

/// The orthogonal polar factor U Vᵀ of a square matrix (its nearest orthogonal matrix).
pub fn polar(x: &Mat<f64>) -> Mat<f64> {
    match x.svd() {
        Ok(svd) => svd.U() * svd.V().transpose(),
        Err(_) => x.clone(),
    }
}

/// ‖XᵀX − I‖_max of a row-major n × n matrix.
pub fn orthogonality_error(x: &[f64], n: usize) -> f64 {
    let m = mat(x, n);
    let e = m.transpose() * &m - Mat::<f64>::identity(n, n);
    let mut worst = 0f64;
    for i in 0..n {
        for j in 0..n {
            worst = worst.max(e[(i, j)].abs());
        }
    }
    worst
}

/// Elementwise Adam state of a vector parameter.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub step: usize,
}

impl AdamState {
    pub fn new(n: usize) -> Self {
        AdamState {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    pub fn step(&mut self, x: &mut [f64], g: &[f64], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for (((x, &g), m), v) in x.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *x -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
        }
    }
}
