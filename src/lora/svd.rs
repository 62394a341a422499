//! Truncated SVD of weight matrices (randomized range finder with power iterations, then a small exact SVD),
//! for PiSSA's principal-component initialisation and for folding DoRA into a plain low-rank delta.

use candle_core::{DType, Device, Result, Tensor};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The top `k` singular triplets of a 2-D matrix: `(U [m, k], S [k], Vᵀ [k, n])`, in f64 on the CPU.
pub struct Truncated {
    pub u: DMatrix<f64>,
    pub s: Vec<f64>,
    pub vt: DMatrix<f64>,
}

impl Truncated {
    /// Splits `U S Vᵀ` into `up = U √S` (`[m, k]`) and `down = √S Vᵀ` (`[k, n]`), each times `factor`.
    pub fn balanced_factors(&self, factor: f64, device: &Device) -> Result<(Tensor, Tensor)> {
        let k = self.s.len();
        let roots: Vec<f64> = self.s.iter().map(|s| s.sqrt() * factor).collect();
        let mut up = self.u.clone();
        let mut down = self.vt.clone();
        for (j, root) in roots.iter().enumerate().take(k) {
            up.column_mut(j).scale_mut(*root);
            down.row_mut(j).scale_mut(*root);
        }
        Ok((to_tensor(&up, device)?, to_tensor(&down, device)?))
    }
}

/// Converts a 2-D tensor (any float dtype) to an f64 matrix.
pub fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &values))
}

/// Converts an f64 matrix to a 2-D f32 tensor.
pub fn to_tensor(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let values: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| m[(r, c)] as f32))
        .collect();
    Tensor::from_vec(values, (rows, cols), device)
}

/// The best rank-`k` factorisation of `a` (exact SVD for small matrices, randomized otherwise).
pub fn truncated_svd(a: &DMatrix<f64>, k: usize, seed: u64) -> Truncated {
    let (m, n) = a.shape();
    let k = k.min(m).min(n).max(1);
    let oversampled = (k + 10).min(m.min(n));
    let basis = if oversampled >= m.min(n) {
        None
    } else {
        // Range finder: Q spans A Ω, refined by two power iterations.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let omega = DMatrix::from_fn(n, oversampled, |_, _| StandardNormal.sample(&mut rng));
        let mut q = (a * omega).qr().q();
        for _ in 0..2 {
            let z = (a.transpose() * &q).qr().q();
            q = (a * z).qr().q();
        }
        Some(q)
    };
    let small = match &basis {
        Some(q) => q.transpose() * a,
        None => a.clone(),
    };
    let svd = small.svd(true, true);
    let (Some(u_small), Some(vt)) = (svd.u, svd.v_t) else {
        return Truncated {
            u: DMatrix::zeros(m, k),
            s: vec![0.0; k],
            vt: DMatrix::zeros(k, n),
        };
    };
    // nalgebra does not sort singular values; take the k largest.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    order.truncate(k);
    let u_full = match &basis {
        Some(q) => q * u_small,
        None => u_small,
    };
    Truncated {
        u: DMatrix::from_fn(m, order.len(), |r, c| u_full[(r, order[c])]),
        s: order.iter().map(|&i| svd.singular_values[i]).collect(),
        vt: DMatrix::from_fn(order.len(), n, |r, c| vt[(order[r], c)]),
    }
}

#[cfg(test)]
mod tests {
    use nalgebra::DMatrix;

    use super::truncated_svd;

    #[test]
    fn recovers_a_low_rank_matrix() {
        // A rank-3 matrix, 60 x 40.
        let left = DMatrix::from_fn(60, 3, |r, c| ((r * 7 + c * 3) % 11) as f64 - 5.0);
        let right = DMatrix::from_fn(3, 40, |r, c| ((r * 5 + c * 2) % 7) as f64 - 3.0);
        let a = &left * &right;
        for k in [3, 5] {
            let t = truncated_svd(&a, k, 1);
            let mut s = DMatrix::zeros(t.s.len(), t.s.len());
            for (i, v) in t.s.iter().enumerate() {
                s[(i, i)] = *v;
            }
            let rebuilt = &t.u * s * &t.vt;
            assert!((rebuilt - &a).norm() / a.norm() < 1e-9);
            assert!(t.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }
}
