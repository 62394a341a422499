//! The optimizers, with state that checkpoints save and restore exactly.
//!
//! * AdamW, as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments).
//! * Adafactor (Shazeer & Stern 2018) with a fixed learning rate and no first moment, as kohya recommends it
//!   for LoRA (`relative_step=False, scale_parameter=False, warmup_init=False`). It is the memory-lean choice:
//!   for an `[m, n]` adapter matrix it keeps `m + n` numbers instead of AdamW's `2·m·n`, and needs no
//!   quantisation kernels (8-bit states would need custom CUDA code to be worth it). Tensors of higher rank
//!   are factored as `[dim0, rest]`.

use std::collections::HashMap;

use candle_core::{D, DType, Result, Tensor, Var};

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
                        let rows = var.dims()[0];
                        Moments::Factored {
                            row: zeros(&[rows])?,
                            col: zeros(&[var.elem_count() / rows])?,
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
                    *m = ((&*m * s.beta1)? + (grad * (1.0 - s.beta1))?)?;
                    *v = ((&*v * s.beta2)? + (grad.sqr()? * (1.0 - s.beta2))?)?;
                    let bias1 = 1.0 - s.beta1.powf(t);
                    let bias2 = 1.0 - s.beta2.powf(t);
                    let denom = ((v.sqrt()? / bias2.sqrt())? + s.eps)?;
                    let decayed = (param * (1.0 - lr * s.weight_decay))?;
                    (decayed - (m.div(&denom)? * (lr / bias1))?)?
                }
                Moments::Factored { row, col } => {
                    let beta2 = 1.0 - t.powf(ADAFACTOR_DECAY);
                    let rows = row.dim(0)?;
                    let g = grad.reshape((rows, ()))?;
                    let squared = (g.sqr()? + ADAFACTOR_EPS)?;
                    *row = ((&*row * beta2)? + (squared.mean(D::Minus1)? * (1.0 - beta2))?)?;
                    *col = ((&*col * beta2)? + (squared.mean(0)? * (1.0 - beta2))?)?;
                    // v ≈ row·colᵀ / mean(row)
                    let row_factor = row
                        .broadcast_div(&row.mean_all()?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(1)?;
                    let col_factor = col.sqrt()?.recip()?.unsqueeze(0)?;
                    let update = g
                        .broadcast_mul(&row_factor)?
                        .broadcast_mul(&col_factor)?
                        .reshape(grad.dims())?;
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
                    *row = take(format!("{name}.exp_avg_sq_row"), row)?;
                    *col = take(format!("{name}.exp_avg_sq_col"), col)?;
                }
                Moments::Unfactored { v } => *v = take(format!("{name}.exp_avg_sq"), v)?,
            }
        }
        self.step = step;
        Ok(())
    }
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
    use candle_core::{Device, Tensor, Var};

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

    #[test]
    fn adafactor_descends_and_keeps_little_state() {
        let p = Var::from_tensor(
            &Tensor::ones((8, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let mut opt =
            Optimizer::new(settings(OptimizerKind::Adafactor), &[("p".into(), &p)]).unwrap();
        for _ in 0..10 {
            let grad = p.as_tensor().clone();
            opt.apply(&[&p], &[Some(grad)], &[0.01]).unwrap();
        }
        let norm = p
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm < 128.0, "the loss |p|² must go down, got {norm}");
        let state: usize = opt.state().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(state, 8 + 16);
    }
}
