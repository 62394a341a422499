//! The optimizers, with state that checkpoints save and restore exactly.
//!
//! * AdamW, as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments).
//! * Adafactor (Shazeer & Stern 2018) with a fixed learning rate and no first moment, as transformers'
//!   `Adafactor` computes it with the settings kohya recommends for LoRA (`relative_step=False,
//!   scale_parameter=False, warmup_init=False`). It is the memory-lean choice: for an `[m, n]` adapter
//!   matrix it keeps `m + n` numbers instead of AdamW's `2·m·n`, and needs no quantisation kernels (8-bit
//!   states would need custom CUDA code to be worth it). Tensors of higher rank are factored over their last
//!   two dimensions, as transformers does; checkpoints of format 1 factored them as `[dim0, rest]` and are
//!   converted on load.

use std::collections::HashMap;

use candle_core::{D, DType, Result, Shape, Tensor, Var};

use super::adamw::AdamStep;
use crate::config::OptimizerKind;

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Per-variable state.
#[derive(Debug, Clone)]
enum Moments {
    Adam { m: Tensor, v: Tensor },
    Factored { row: Tensor, col: Tensor },
    Unfactored { v: Tensor },
}

/// An optimizer over a fixed, named list of variables.
pub struct Optimizer {
    settings: OptimizerSettings,
    names: Vec<String>,
    moments: Vec<Moments>,
    /// Updates applied so far.
    pub step: u64,
}

const ADAFACTOR_EPS: f64 = 1e-30;
const ADAFACTOR_CLIP: f64 = 1.0;
const ADAFACTOR_DECAY: f64 = -0.8;

impl Optimizer {
    pub fn new(settings: OptimizerSettings, vars: &[(String, &Var)]) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(_, var)| -> Result<Moments> {
                let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, var.device());
                Ok(match settings.kind {
                    OptimizerKind::AdamW => Moments::Adam {
                        m: zeros(var.dims())?,
                        v: zeros(var.dims())?,
                    },
                    OptimizerKind::Adafactor if var.rank() >= 2 => {
                        let (row, col) = factored_dims(var.dims());
                        Moments::Factored {
                            row: zeros(&row)?,
                            col: zeros(&col)?,
                        }
                    }
                    OptimizerKind::Adafactor => Moments::Unfactored {
                        v: zeros(var.dims())?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            settings,
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            moments,
            step: 0,
        })
    }

    /// Applies one update; `grads[i]` (f32) belongs to `vars[i]` and `lrs[i]` is its learning rate.
    /// Variables without a gradient are left alone.
    pub fn apply(&mut self, vars: &[&Var], grads: &[Option<Tensor>], lrs: &[f64]) -> Result<()> {
        self.step += 1;
        let t = self.step as f64;
        let s = self.settings;
        for (i, var) in vars.iter().enumerate() {
            let Some(grad) = &grads[i] else { continue };
            // The moments outlive the step: they must never hold a graph.
            let grad = &grad.detach();
            let lr = lrs[i];
            let param = var.as_tensor().to_dtype(DType::F32)?;
            let updated = match &mut self.moments[i] {
                Moments::Adam { m, v } => {
                    let adam = AdamStep {
                        beta1: s.beta1,
                        beta2: s.beta2,
                        eps: s.eps,
                        weight_decay: s.weight_decay,
                        lr,
                        step: self.step,
                    };
                    let updated = adam.update(&param, grad, (m, v))?;
                    (*m, *v) = (updated.m, updated.v);
                    updated.param
                }
                Moments::Factored { row, col } => {
                    // Over the last two dimensions `[.., m, n]`: row `[.., m]`, col `[.., n]`.
                    let beta2 = 1.0 - t.powf(ADAFACTOR_DECAY);
                    let squared = (grad.sqr()? + ADAFACTOR_EPS)?;
                    *row = ((&*row * beta2)? + (squared.mean(D::Minus1)? * (1.0 - beta2))?)?;
                    *col = ((&*col * beta2)? + (squared.mean(D::Minus2)? * (1.0 - beta2))?)?;
                    // v ≈ row·colᵀ / mean(row), per leading index
                    let row_factor = row
                        .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(D::Minus1)?;
                    let col_factor = col.sqrt()?.recip()?.unsqueeze(col.rank() - 1)?;
                    let update = grad
                        .broadcast_mul(&row_factor)?
                        .broadcast_mul(&col_factor)?;
                    adafactor_finish(param, update, lr, s.weight_decay)?
                }
                Moments::Unfactored { v } => {
                    let beta2 = 1.0 - t.powf(ADAFACTOR_DECAY);
                    *v = ((&*v * beta2)? + ((grad.sqr()? + ADAFACTOR_EPS)? * (1.0 - beta2))?)?;
                    let update = (grad * v.sqrt()?.recip()?)?;
                    adafactor_finish(param, update, lr, s.weight_decay)?
                }
            };
            var.set(&updated.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The state as named tensors (for checkpoints), plus the step.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (name, moments) in self.names.iter().zip(&self.moments) {
            match moments {
                Moments::Adam { m, v } => {
                    tensors.push((format!("{name}.exp_avg"), m.clone()));
                    tensors.push((format!("{name}.exp_avg_sq"), v.clone()));
                }
                Moments::Factored { row, col } => {
                    tensors.push((format!("{name}.exp_avg_sq_row"), row.clone()));
                    tensors.push((format!("{name}.exp_avg_sq_col"), col.clone()));
                }
                Moments::Unfactored { v } => {
                    tensors.push((format!("{name}.exp_avg_sq"), v.clone()))
                }
            }
        }
        tensors
    }

    /// Restores the state saved by [`state`](Self::state) for the same variables.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
    ) -> std::result::Result<(), String> {
        let take = |key: String, like: &Tensor| -> std::result::Result<Tensor, String> {
            let t = tensors
                .get(&key)
                .ok_or_else(|| format!("the optimizer state has no `{key}`"))?;
            if t.dims() != like.dims() {
                return Err(format!(
                    "`{key}` has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                ));
            }
            t.to_dtype(DType::F32)
                .and_then(|t| t.to_device(like.device()))
                .map_err(|e| e.to_string())
        };
        for (name, moments) in self.names.iter().zip(self.moments.iter_mut()) {
            match moments {
                Moments::Adam { m, v } => {
                    *m = take(format!("{name}.exp_avg"), m)?;
                    *v = take(format!("{name}.exp_avg_sq"), v)?;
                }
                Moments::Factored { row, col } => {
                    let (row_key, col_key) = (
                        format!("{name}.exp_avg_sq_row"),
                        format!("{name}.exp_avg_sq_col"),
                    );
                    let saved = (tensors.get(&row_key), tensors.get(&col_key));
                    match saved {
                        (Some(r), Some(c)) if r.rank() == 1 && row.rank() > 1 => {
                            (*row, *col) = refactored(r, c, row.shape(), col.shape())
                                .map_err(|e| format!("`{row_key}` cannot be converted ({e})"))?;
                        }
                        _ => {
                            *row = take(row_key, row)?;
                            *col = take(col_key, col)?;
                        }
                    }
                }
                Moments::Unfactored { v } => *v = take(format!("{name}.exp_avg_sq"), v)?,
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The shapes of the row and column second moments of a tensor of shape `dims` (rank 2 or more):
/// `[.., m, n]` keeps `[.., m]` and `[.., n]`.
fn factored_dims(dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let last = dims.len() - 1;
    let row = dims[..last].to_vec();
    let mut col = dims[..last - 1].to_vec();
    col.push(dims[last]);
    (row, col)
}

/// The row and column moments (of shapes `row_shape`, `col_shape`) of the second-moment estimate that a
/// format-1 checkpoint's `[dim0, rest]` factorisation `row₀ · col₀ᵀ / mean(row₀)` gives.
fn refactored(
    old_row: &Tensor,
    old_col: &Tensor,
    row_shape: &Shape,
    col_shape: &Shape,
) -> Result<(Tensor, Tensor)> {
    let (old_row, old_col) = (old_row.to_dtype(DType::F32)?, old_col.to_dtype(DType::F32)?);
    let estimate = old_row
        .broadcast_div(&old_row.mean_all()?)?
        .unsqueeze(1)?
        .broadcast_mul(&old_col.unsqueeze(0)?)?;
    let mut dims = row_shape.dims().to_vec();
    dims.push(col_shape.dims()[col_shape.rank() - 1]);
    let estimate = estimate.reshape(dims)?;
    Ok((estimate.mean(D::Minus1)?, estimate.mean(D::Minus2)?))
}

/// Adafactor's update clipping (RMS at most 1), learning rate and decoupled weight decay.
fn adafactor_finish(param: Tensor, update: Tensor, lr: f64, weight_decay: f64) -> Result<Tensor> {
    let rms = update.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    let update = (update * (lr / (rms / ADAFACTOR_CLIP).max(1.0)))?;
    let decayed = (&param - (&param * (weight_decay * lr))?)?;
    decayed - update
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, Var};

    use super::{Optimizer, OptimizerSettings};
    use crate::config::OptimizerKind;

    fn settings(kind: OptimizerKind) -> OptimizerSettings {
        OptimizerSettings {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = [1, -2] with grads [0.5, 0.25] then
        // [-0.5, 1.0] gives p = [0.9033642, -2.1843395] (torch 2.15).
        let p = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(settings(OptimizerKind::AdamW), &[("p".into(), &p)]).unwrap();
        for g in [[0.5f32, 0.25], [-0.5, 1.0]] {
            let grad = Tensor::new(&g, &Device::Cpu).unwrap();
            opt.apply(&[&p], &[Some(grad)], &[0.1]).unwrap();
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        let expected = [0.903_364_2f32, -2.184_339_5];
        assert!(
            (got[0] - expected[0]).abs() < 1e-5 && (got[1] - expected[1]).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn the_state_never_holds_the_graph_a_gradient_came_with() {
        // candle returns a variable's gradient still attached to the forward pass when the variable
        // feeds an op directly (a conv kernel's gradient is a conv of the activations); a moment built
        // from it would keep every step's activations alive.
        for kind in [OptimizerKind::AdamW, OptimizerKind::Adafactor] {
            let w = Var::ones((2, 3, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(settings(kind), &[("w".into(), &w)]).unwrap();
            for _ in 0..2 {
                let x = Var::ones((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
                let activations = (x.as_tensor() * 2.0).unwrap();
                let y = activations.conv2d(w.as_tensor(), 0, 1, 1, 1).unwrap();
                let grads = y.sum_all().unwrap().backward().unwrap();
                let grad = grads.get(&w).unwrap().clone();
                assert!(grad.track_op(), "candle now detaches: this guard can go");
                opt.apply(&[&w], &[Some(grad)], &[0.1]).unwrap();
            }
            for (name, tensor) in opt.state() {
                assert!(!tensor.track_op(), "{kind:?}: {name} holds a graph");
            }
        }
    }

    /// One tensor of `tests/fixtures/optimizers/adafactor.json`.
    #[derive(serde::Deserialize)]
    struct Recorded {
        shape: Vec<usize>,
        initial: Vec<f32>,
        grads: Vec<Vec<f32>>,
        #[serde(rename = "final")]
        after: Vec<f32>,
        state: HashMap<String, serde_json::Value>,
    }

    #[test]
    fn adafactor_matches_transformers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/optimizers/adafactor.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tensors: HashMap<String, Recorded> =
            serde_json::from_value(json["tensors"].clone()).unwrap();
        let (lr, weight_decay) = (
            json["lr"].as_f64().unwrap(),
            json["weight_decay"].as_f64().unwrap(),
        );
        let adafactor = OptimizerSettings {
            weight_decay,
            ..settings(OptimizerKind::Adafactor)
        };
        for (name, recorded) in &tensors {
            let device = Device::Cpu;
            let tensor =
                |values: &[f32]| Tensor::from_slice(values, recorded.shape.as_slice(), &device);
            let p = Var::from_tensor(&tensor(&recorded.initial).unwrap()).unwrap();
            let mut opt = Optimizer::new(adafactor, &[(name.clone(), &p)]).unwrap();
            for grad in &recorded.grads {
                opt.apply(&[&p], &[Some(tensor(grad).unwrap())], &[lr])
                    .unwrap();
            }
            let got = p
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let worst = got
                .iter()
                .zip(&recorded.after)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{name}: parameters differ by {worst}");
            let moved = got
                .iter()
                .zip(&recorded.initial)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                moved > 100.0 * 1e-6,
                "{name}: three steps moved it by {moved} only"
            );
            for (key, tensor) in opt.state() {
                let key = key.strip_prefix(&format!("{name}.")).unwrap();
                let expected: Vec<f32> =
                    serde_json::from_value(recorded.state[key].clone()).unwrap();
                let ours = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(ours.len(), expected.len(), "{name}.{key}");
                for (a, b) in ours.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                        "{name}.{key}: {a} vs {b}"
                    );
                }
            }
        }
        let matrix: usize = Optimizer::new(
            adafactor,
            &[(
                "m".into(),
                &Var::zeros((8, 16), DType::F32, &Device::Cpu).unwrap(),
            )],
        )
        .unwrap()
        .state()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
        assert_eq!(matrix, 8 + 16, "an [m, n] matrix keeps m + n numbers");
    }

    #[test]
    fn format_1_adafactor_state_of_a_conv_kernel_is_converted() {
        // Format 1 factored a [2, 3, 3, 3] kernel as [2] x [27]; the estimate it stands for is
        // row·colᵀ/mean(row), whose per-slice means are the new row [2, 3, 3] and col [2, 3, 3].
        let device = Device::Cpu;
        let w = Var::zeros((2, 3, 3, 3), DType::F32, &device).unwrap();
        let mut opt =
            Optimizer::new(settings(OptimizerKind::Adafactor), &[("w".into(), &w)]).unwrap();
        let old_row = Tensor::new(&[1f32, 3.0], &device).unwrap();
        let old_col = Tensor::arange(1f32, 28.0, &device).unwrap();
        let saved = HashMap::from([
            ("w.exp_avg_sq_row".to_string(), old_row),
            ("w.exp_avg_sq_col".to_string(), old_col),
        ]);
        opt.load_state(&saved, 7).unwrap();
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let row = state["w.exp_avg_sq_row"].to_vec3::<f32>().unwrap();
        let col = state["w.exp_avg_sq_col"].to_vec3::<f32>().unwrap();
        // Estimate at (i, j, k, l) = row0[i] / 2 · (9j + 3k + l + 1).
        let estimate = |i: usize, j: usize, k: usize, l: usize| {
            [1.0f32, 3.0][i] / 2.0 * (9 * j + 3 * k + l + 1) as f32
        };
        for (i, j, k) in
            (0..2).flat_map(|i| (0..3).flat_map(move |j| (0..3).map(move |k| (i, j, k))))
        {
            let mean_l = (0..3).map(|l| estimate(i, j, k, l)).sum::<f32>() / 3.0;
            let mean_k = (0..3).map(|kk| estimate(i, j, kk, k)).sum::<f32>() / 3.0;
            assert!((row[i][j][k] - mean_l).abs() < 1e-5, "row {i}{j}{k}");
            assert!((col[i][j][k] - mean_k).abs() < 1e-5, "col {i}{j}{k}");
        }
        assert_eq!(opt.step, 7);
    }
}
