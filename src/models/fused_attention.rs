//! Memory-efficient attention with its own backward pass.
//!
//! Composed from candle ops, attention over 4096 tokens keeps the `[heads, 4096, 4096]` scores, the
//! probabilities and every intermediate of the softmax alive for the backward pass (gigabytes per block at
//! 512 px) and differentiates the softmax through generic element-wise ops. Here the forward pass runs in
//! chunks of query rows on detached tensors (candle's fused softmax), keeping only `q`, `k`, `v` and the
//! output; the backward pass recomputes each chunk's probabilities and applies the softmax gradient
//! directly: with `P = softmax(q·kᵀ·s)` and `D = rowsum(dO ⊙ O)`,
//! `dV = Pᵀ·dO`, `dS = P ⊙ (dO·vᵀ − D)`, `dQ = dS·k·s`, `dK = dSᵀ·q·s`. On the CPU both passes run in
//! [`super::flash_attention`]'s cache-sized tiles; other devices use chunks of candle ops.

use candle_core::{D, DType, Result, Tensor, WithDType};

use super::flash_attention::{self, AttentionDims, Element};
use crate::lora::{TiedBackward2, tie2};

/// Elements of one chunk's score matrix at most (128 MB in f32).
const CHUNK_ELEMENTS: usize = 32 << 20;

/// `softmax(q·kᵀ·scale)·v` for `q`: `[batch, heads, q_len, d]`, `k`/`v`: `[batch, heads, kv_len, d]`
/// (contiguous, f32 or f64), differentiable in all three.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (batch, heads, _, _) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let rows = if runs_on_cpu_kernel(q) {
        flash_attention::tile_rows(kv_len)
    } else {
        (CHUNK_ELEMENTS / (batch * heads * kv_len).max(1)).max(1)
    };
    attention_in_chunks(q, k, v, scale, rows)
}

/// Whether the tiled CPU kernel ([`flash_attention`]) computes this attention.
fn runs_on_cpu_kernel(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// The kernel's sizes for `q` `[batch, heads, q_len, d]` and `k` `[batch, heads, kv_len, d]`.
fn kernel_dims(q: &Tensor, k: &Tensor, rows: usize) -> Result<AttentionDims> {
    let (batch, heads, q_len, head_dim) = q.dims4()?;
    Ok(AttentionDims {
        heads: batch * heads,
        q_len,
        kv_len: k.dim(2)?,
        head_dim,
        tile_rows: rows,
    })
}

fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn scale_as<T: Element>(scale: f64) -> Result<T> {
    T::from(scale).ok_or_else(|| candle_core::Error::Msg(format!("attention scale {scale}")))
}

fn kernel_forward<T: Element + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    let dims = kernel_dims(q, k, rows)?;
    let out = flash_attention::forward(
        &values::<T>(q)?,
        &values::<T>(k)?,
        &values::<T>(v)?,
        dims,
        scale_as(scale)?,
    );
    Tensor::from_vec(out, q.shape(), q.device())
}

/// The gradients of `q`, `k` and `v` from the kernel.
fn kernel_backward<T: Element + WithDType>(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    output: &Tensor,
    grad: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = kernel_dims(q, k, rows)?;
    let (grad_q, grad_k, grad_v) = flash_attention::backward(
        (&values::<T>(q)?, &values::<T>(k)?, &values::<T>(v)?),
        &values::<T>(output)?,
        &values::<T>(grad)?,
        dims,
        scale_as(scale)?,
    );
    Ok((
        Tensor::from_vec(grad_q, q.shape(), q.device())?,
        Tensor::from_vec(grad_k, k.shape(), k.device())?,
        Tensor::from_vec(grad_v, v.shape(), v.device())?,
    ))
}

/// [`fused_attention`] with `rows` query rows per chunk.
fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    let output = chunked_forward(&q.detach(), &k.detach(), &v.detach(), scale, rows)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(output);
    }
    // A custom op has at most three operands: k and v travel together (cat's backward splits them).
    let kv = Tensor::cat(&[k, v], D::Minus1)?;
    tie2(&output, q, &kv, AttentionBackward { scale, rows })
}

fn chunked_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
    match (q.device().is_cpu(), q.dtype()) {
        (true, DType::F32) => return kernel_forward::<f32>(q, k, v, scale, rows),
        (true, DType::F64) => return kernel_forward::<f64>(q, k, v, scale, rows),
        _ => {}
    }
    let q_len = q.dim(2)?;
    // Scaling the small `q` instead of every score matrix saves a pass over each chunk's scores.
    let q = (q * scale)?;
    let k_t = k.t()?;
    let mut chunks = Vec::with_capacity(q_len.div_ceil(rows));
    for start in (0..q_len).step_by(rows) {
        let q_chunk = q.narrow(2, start, rows.min(q_len - start))?;
        let probs = candle_nn::ops::softmax_last_dim(&q_chunk.matmul(&k_t)?)?;
        chunks.push(probs.matmul(v)?);
    }
    Tensor::cat(&chunks, 2)
}

/// Ties the precomputed output (first operand) to `q` and `kv`; see the module docs.
struct AttentionBackward {
    scale: f64,
    /// Query rows per chunk.
    rows: usize,
}

impl TiedBackward2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn bwd(
        &self,
        _: &Tensor,
        q: &Tensor,
        kv: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, q_len, head_dim) = q.dims4()?;
        if runs_on_cpu_kernel(q) {
            let k = kv.narrow(3, 0, head_dim)?.detach().contiguous()?;
            let v = kv.narrow(3, head_dim, head_dim)?.detach().contiguous()?;
            let operands = (&q.detach(), &k, &v);
            let (output, grad) = (output.detach(), grad.contiguous()?);
            let (grad_q, grad_k, grad_v) = match q.dtype() {
                DType::F32 => {
                    kernel_backward::<f32>(operands, &output, &grad, self.scale, self.rows)?
                }
                _ => kernel_backward::<f64>(operands, &output, &grad, self.scale, self.rows)?,
            };
            let grad_kv = Tensor::cat(&[grad_k, grad_v], D::Minus1)?;
            return Ok((None, Some(grad_q), Some(grad_kv)));
        }
        // With `S = s·q·kᵀ`: `dQ = dS·(s·k)` and `dK = dSᵀ·(s·q)`, so scaling `q` and `k` once (small)
        // replaces scaling every chunk's scores and score gradients.
        let q = (q.detach() * self.scale)?;
        let k = kv.narrow(3, 0, head_dim)?.detach().contiguous()?;
        let k_scaled = (&k * self.scale)?;
        let v = kv.narrow(3, head_dim, head_dim)?.detach().contiguous()?;
        let grad = grad.contiguous()?;
        let row_dot = (&grad * output.detach())?.sum_keepdim(D::Minus1)?;
        let (k_t, v_t) = (k.t()?, v.t()?);
        let rows = self.rows;
        let mut grad_q = Vec::with_capacity(q_len.div_ceil(rows));
        let mut grad_k = k.zeros_like()?;
        let mut grad_v = v.zeros_like()?;
        for start in (0..q_len).step_by(rows) {
            let len = rows.min(q_len - start);
            let q_chunk = q.narrow(2, start, len)?;
            let grad_chunk = grad.narrow(2, start, len)?;
            let probs = candle_nn::ops::softmax_last_dim(&q_chunk.matmul(&k_t)?)?;
            grad_v = (grad_v + probs.t()?.matmul(&grad_chunk)?)?;
            let grad_probs = grad_chunk.matmul(&v_t)?;
            let grad_scores =
                (probs * grad_probs.broadcast_sub(&row_dot.narrow(2, start, len)?)?)?;
            grad_q.push(grad_scores.matmul(&k_scaled)?);
            grad_k = (grad_k + grad_scores.t()?.matmul(&q_chunk)?)?;
        }
        let grad_kv = Tensor::cat(&[grad_k, grad_v], D::Minus1)?;
        Ok((None, Some(Tensor::cat(&grad_q, 2)?), Some(grad_kv)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::attention_in_chunks;

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn matches_composed_attention_and_its_gradients() {
        // 37 query rows in chunks of 8: four full chunks and a short one.
        let (q_len, kv_len) = (37, 23);
        let device = Device::Cpu;
        let var = |len: usize, seed: f64| {
            let t = Tensor::arange(0f64, (2 * 3 * len * 4) as f64, &device)
                .unwrap()
                .affine(0.37, seed)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((2, 3, len, 4))
                .unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let (q, k, v) = (var(q_len, 0.1), var(kv_len, 0.7), var(kv_len, 1.3));
        let weights = var(q_len, 2.1);
        let scale = 0.5;
        let ours =
            attention_in_chunks(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, 8).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
        assert!(max_abs_diff(&ours, &reference) < 1e-12);
        let loss = |out: &Tensor| (out * weights.as_tensor()).unwrap().sum_all().unwrap();
        let ours_grads = loss(&ours).backward().unwrap();
        let reference_grads = loss(&reference).backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_abs_diff(ours_grads.get(x).unwrap(), reference_grads.get(x).unwrap());
            assert!(diff < 1e-10, "d{name} differs by {diff}");
        }
    }
}
