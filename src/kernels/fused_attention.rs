//! Memory-efficient attention with its own backward pass.
//!
//! Composed from candle ops, attention over 4096 tokens keeps the `[heads, 4096, 4096]` scores, the
//! probabilities and every intermediate of the softmax alive for the backward pass (gigabytes per block at
//! 512 px) and differentiates the softmax through generic element-wise ops. Here the heads are split off,
//! attended in chunks of query rows and merged back on detached tensors, so the graph keeps only `q`, `k`,
//! `v` and the output, all in token layout; the backward pass recomputes each chunk's probabilities and
//! applies the softmax gradient directly: with `P = softmax(q·kᵀ·s)` and `D = rowsum(dO ⊙ O)`,
//! `dV = Pᵀ·dO`, `dS = P ⊙ (dO·vᵀ − D)`, `dQ = dS·k·s`, `dK = dSᵀ·q·s`. On the CPU both passes run in
//! [`super::flash_attention`]'s cache-sized tiles, the head layout read from and written back to the
//! token layout in one parallel pass each; other devices use chunks of candle ops (candle's fused softmax).

use candle_core::{D, DType, Device, Result, Storage, Tensor, WithDType};

use super::fill::par_filled;
use super::flash_attention::{self, AttentionDims, Element};
use super::tied::{Ready, TiedBackward, tie};

/// Elements of one chunk's score matrix at most (128 MB in f32).
const CHUNK_ELEMENTS: usize = 32 << 20;

/// `softmax(q·kᵀ·scale)·v` over `heads` heads for `q`: `[batch, q_len, heads·d]` and `k`/`v`:
/// `[batch, kv_len, heads·d]` (f32 or f64 for the CPU kernel), differentiable in all three; the result is
/// shaped like `q`.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (batch, kv_len, _) = k.dims3()?;
    let rows = if runs_on_cpu_kernel(q) {
        flash_attention::tile_rows(kv_len)
    } else {
        (CHUNK_ELEMENTS / (batch * heads * kv_len).max(1)).max(1)
    };
    attention_in_chunks((q, k, v), heads, scale, (rows, runs_on_cpu_kernel(q)))
}

/// `[batch, len, heads·d]` as a contiguous `[batch, heads, len, d]`, detached.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, len, width) = t.dims3()?;
    t.detach()
        .reshape((batch, len, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[batch, heads, len, d]` as a contiguous `[batch, len, heads·d]`.
fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (batch, heads, len, head_dim) = t.dims4()?;
    t.transpose(1, 2)?
        .contiguous()?
        .reshape((batch, len, heads * head_dim))
}

/// Whether the tiled CPU kernel ([`flash_attention`]) computes this attention.
fn runs_on_cpu_kernel(q: &Tensor) -> bool {
    super::cpu_kernels(q.device()) && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// The kernel's sizes for token-layout `q` `[batch, q_len, heads·d]` and `k` `[batch, kv_len, heads·d]`.
fn kernel_dims(q: &Tensor, k: &Tensor, heads: usize, rows: usize) -> Result<AttentionDims> {
    let (batch, q_len, width) = q.dims3()?;
    Ok(AttentionDims {
        heads: batch * heads,
        q_len,
        kv_len: k.dim(1)?,
        head_dim: width / heads,
        tile_rows: rows,
        bf16_products: super::products::bf16_products(),
    })
}

/// The values of a token-layout `[batch, len, heads·d]` tensor (on the CPU) in head layout
/// `[batch·heads, len, d]`, heads in parallel.
fn head_values<T: WithDType>(t: &Tensor, heads: usize) -> Result<Vec<T>> {
    let (_, len, width) = t.dims3()?;
    let head_dim = width / heads;
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(storage), Some((start, end))) = (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("attention: the kernel reads contiguous tensors on the CPU");
    };
    let tokens = &T::cpu_storage_as_slice(storage)?[start..end];
    if head_dim == 0 {
        return Ok(vec![T::zero(); tokens.len()]);
    }
    Ok(par_filled(
        tokens.len(),
        len * head_dim,
        T::zero(),
        |index, head| {
            let (image, h) = (index / heads, index % heads);
            let image_tokens = &tokens[image * len * width..];
            for (token, row) in head.chunks_mut(head_dim).enumerate() {
                row.copy_from_slice(&image_tokens[token * width + h * head_dim..][..head_dim]);
            }
        },
    ))
}

/// The token layout `[batch, len, width]` of head-layout values `[batch·heads, len, width/heads]`,
/// tokens in parallel.
fn token_values<T: WithDType>(
    values: &[T],
    (_, len, width): (usize, usize, usize),
    heads: usize,
) -> Vec<T> {
    let head_dim = width / heads;
    if head_dim == 0 {
        return vec![T::zero(); values.len()];
    }
    par_filled(values.len(), width, T::zero(), |index, row| {
        let (image, token) = (index / len, index % len);
        for (h, part) in row.chunks_mut(head_dim).enumerate() {
            let head = &values[(image * heads + h) * len * head_dim..];
            part.copy_from_slice(&head[token * head_dim..][..head_dim]);
        }
    })
}

/// [`token_values`] as a tensor.
fn token_tensor<T: WithDType>(
    values: &[T],
    dims: (usize, usize, usize),
    heads: usize,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(token_values(values, dims, heads), dims, device)
}

fn scale_as<T: Element>(scale: f64) -> Result<T> {
    T::from(scale).ok_or_else(|| candle_core::Error::Msg(format!("attention scale {scale}")))
}

/// The kernel's output (token layout, CPU values) and the log-sum-exp of each query's scores
/// (`[batch·heads, q_len]`).
fn kernel_forward<T: Element + WithDType>(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    heads: usize,
    scale: f64,
    rows: usize,
) -> Result<(Ready, Tensor)> {
    let dims = kernel_dims(q, k, heads, rows)?;
    let (out, log_sum_exp) = flash_attention::forward(
        &head_values::<T>(q, heads)?,
        &head_values::<T>(k, heads)?,
        &head_values::<T>(v, heads)?,
        dims,
        scale_as(scale)?,
    );
    let output = T::to_cpu_storage_owned(token_values(&out, q.dims3()?, heads));
    Ok((
        Ready::Cpu(output, q.shape().clone()),
        Tensor::from_vec(log_sum_exp, (dims.heads, dims.q_len), q.device())?,
    ))
}

/// The gradients of `q`, `k` and `v` (token layout) from the kernel.
fn kernel_backward<T: Element + WithDType>(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (output, log_sum_exp): (&Tensor, &Tensor),
    grad: &Tensor,
    (heads, scale, rows): (usize, f64, usize),
) -> Result<Vec<Option<Tensor>>> {
    let dims = kernel_dims(q, k, heads, rows)?;
    let (grad_q, grad_k, grad_v) = flash_attention::backward(
        (
            &head_values::<T>(q, heads)?,
            &head_values::<T>(k, heads)?,
            &head_values::<T>(v, heads)?,
        ),
        (
            &head_values::<T>(output, heads)?,
            &log_sum_exp.flatten_all()?.to_vec1::<T>()?,
        ),
        &head_values::<T>(grad, heads)?,
        dims,
        scale_as(scale)?,
    );
    Ok(vec![
        Some(token_tensor(&grad_q, q.dims3()?, heads, q.device())?),
        Some(token_tensor(&grad_k, k.dims3()?, heads, k.device())?),
        Some(token_tensor(&grad_v, v.dims3()?, heads, v.device())?),
    ])
}

/// [`fused_attention`] with `rows` query rows per chunk, by the CPU kernel or by chunks of candle ops.
fn attention_in_chunks(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    heads: usize,
    scale: f64,
    (rows, kernel): (usize, bool),
) -> Result<Tensor> {
    let with_statistics = |(output, log_sum_exp)| (output, Some(log_sum_exp));
    let (output, log_sum_exp) = match (kernel, q.dtype()) {
        (true, DType::F32) => {
            kernel_forward::<f32>((q, k, v), heads, scale, rows).map(with_statistics)?
        }
        (true, _) => kernel_forward::<f64>((q, k, v), heads, scale, rows).map(with_statistics)?,
        _ => {
            let [q_heads, k_heads, v_heads] = [q, k, v].map(|t| split_heads(t, heads));
            let output = chunked_forward(&q_heads?, &k_heads?, &v_heads?, scale, rows)?;
            (Ready::Tensor(merge_heads(&output)?), None)
        }
    };
    tie(
        output,
        &[q, k, v],
        AttentionBackward {
            heads,
            scale,
            rows,
            log_sum_exp,
        },
    )
}

/// The attention of head-layout tensors `[batch, heads, len, d]` in chunks of `rows` query rows.
fn chunked_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
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

/// Ties the precomputed output to `q`, `k` and `v`; see the module docs.
struct AttentionBackward {
    heads: usize,
    scale: f64,
    /// Query rows per chunk.
    rows: usize,
    /// The CPU kernel's log-sum-exp of each query's scores.
    log_sum_exp: Option<Tensor>,
}

impl TiedBackward for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn bwd(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        if let Some(log_sum_exp) = &self.log_sum_exp {
            let operands = (inputs[0], inputs[1], inputs[2]);
            let settings = (self.heads, self.scale, self.rows);
            return match output.dtype() {
                DType::F32 => {
                    kernel_backward::<f32>(operands, (output, log_sum_exp), grad, settings)
                }
                _ => kernel_backward::<f64>(operands, (output, log_sum_exp), grad, settings),
            };
        }
        let [q, k, v] = [inputs[0], inputs[1], inputs[2]].map(|t| split_heads(t, self.heads));
        let (q, k, v) = (q?, k?, v?);
        let (output, grad) = (
            split_heads(output, self.heads)?,
            split_heads(grad, self.heads)?,
        );
        let (grad_q, grad_k, grad_v) = self.head_gradients((&q, &k, &v), &output, &grad)?;
        Ok(vec![
            Some(merge_heads(&grad_q)?),
            Some(merge_heads(&grad_k)?),
            Some(merge_heads(&grad_v)?),
        ])
    }
}

impl AttentionBackward {
    /// The gradients of `q`, `k` and `v` by chunks of candle ops, all in head layout
    /// `[batch, heads, len, d]`.
    fn head_gradients(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let q_len = q.dim(2)?;
        // With `S = s·q·kᵀ`: `dQ = dS·(s·k)` and `dK = dSᵀ·(s·q)`, so scaling `q` and `k` once (small)
        // replaces scaling every chunk's scores and score gradients.
        let q = (q * self.scale)?;
        let k_scaled = (k * self.scale)?;
        let row_dot = (grad * output)?.sum_keepdim(D::Minus1)?;
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
        Ok((Tensor::cat(&grad_q, 2)?, grad_k, grad_v))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::{attention_in_chunks, merge_heads, split_heads};

    /// Composed attention over 3 heads of token-layout tensors.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let [q, k, v] = [q, k, v].map(|t| {
            t.reshape((2, (), 3, 4))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        });
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((2, (), 12))
            .unwrap()
    }

    #[test]
    fn heads_split_and_merge_back() {
        let t = Tensor::arange(0f64, 2.0 * 5.0 * 12.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 5, 12))
            .unwrap();
        let heads = split_heads(&t, 3).unwrap();
        assert_eq!(heads.dims(), &[2, 3, 5, 4]);
        // Token 1 of image 0, head 2: columns 8..12 of row 1.
        let head_row: Vec<f64> = heads
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .get(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(head_row, vec![20.0, 21.0, 22.0, 23.0]);
        assert_eq!(max_abs_diff(&merge_heads(&heads).unwrap(), &t), 0.0);
    }

    #[test]
    fn matches_composed_attention_and_its_gradients() {
        // 37 query rows in chunks of 8: four full chunks and a short one.
        let (q_len, kv_len) = (37, 23);
        let device = Device::Cpu;
        let var = |len: usize, seed: f64| {
            let t = Tensor::arange(0f64, (2 * len * 12) as f64, &device)
                .unwrap()
                .affine(0.37, seed)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((2, len, 12))
                .unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let (q, k, v) = (var(q_len, 0.1), var(kv_len, 0.7), var(kv_len, 1.3));
        let weights = var(q_len, 2.1);
        let scale = 0.5;
        let operands = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let reference = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
        let loss = |out: &Tensor| (out * weights.as_tensor()).unwrap().sum_all().unwrap();
        let reference_grads = loss(&reference).backward().unwrap();
        // The CPU kernel, and the chunks of candle ops that other devices run.
        for kernel in [true, false] {
            let ours = attention_in_chunks(operands, 3, scale, (8, kernel)).unwrap();
            assert!(max_abs_diff(&ours, &reference) < 1e-12, "kernel {kernel}");
            let ours_grads = loss(&ours).backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff =
                    max_abs_diff(ours_grads.get(x).unwrap(), reference_grads.get(x).unwrap());
                assert!(diff < 1e-10, "kernel {kernel}: d{name} differs by {diff}");
            }
        }
    }
}
