//! The arithmetic of the CPU kernels' matrix products: f32, or — inside a [`Bf16Products`] scope on a
//! processor with AMX or AVX-512 BF16 — bf16 operands summed in f32 ([`super::amx`]), as PyTorch
//! computes a CPU autocast region. The scope belongs to one thread (a training run's), so products
//! elsewhere in the process, the parity tests' included, stay f32; kernels that spread work over threads
//! read the choice before they do.

use std::cell::Cell;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

use half::slice::HalfFloatSliceExt;

use super::amx::{self, Operand, Orientation, Source, TileView, Values};
use super::frozen_weight::{FrozenWeight, tiles_tensor};
use super::tied::Ready;

thread_local! {
    /// Whether this thread is inside a [`Bf16Products`] scope.
    static BF16_PRODUCTS: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the matrix products of the project's CPU kernels on this thread take bf16 operands (on AMX
/// tiles, or with AVX-512 BF16 dot products); dropping it restores what was before.
#[must_use = "products return to the previous arithmetic when the scope is dropped"]
pub struct Bf16Products {
    previous: bool,
}

impl Bf16Products {
    /// Enters the scope where the processor has bf16 products; `None` (products stay f32) elsewhere.
    pub fn enter() -> Option<Self> {
        amx::available().then(|| Self {
            previous: BF16_PRODUCTS.replace(true),
        })
    }
}

impl Drop for Bf16Products {
    fn drop(&mut self) {
        BF16_PRODUCTS.set(self.previous);
        if !self.previous {
            amx::release_buffers();
        }
    }
}

/// Whether this processor can take bf16 products (a [`Bf16Products`] scope exists here).
pub fn bf16_products_available() -> bool {
    amx::available()
}

/// What runs this processor's bf16 products, for messages (`None` without them).
pub fn bf16_products_engine() -> Option<&'static str> {
    amx::engine().map(|engine| match engine {
        amx::Engine::Tiles => "AMX tiles",
        amx::Engine::DotProducts => "AVX-512 BF16 dot products",
    })
}

/// Whether the CPU kernels' products on this thread are bf16 ones now.
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.get()
}

/// The name of this thread's product arithmetic: `bf16` inside a [`Bf16Products`] scope, else `f32`.
pub fn product_arithmetic() -> &'static str {
    if bf16_products() { "bf16" } else { "f32" }
}

/// `a · b` like candle's `broadcast_matmul` — `a` `[.., m, k]`, `b` `[.., k, n]` with the same leading
/// dimensions, or a matrix `[k, n]` for all of them — in bf16 products on CPU f32 tensors inside a
/// [`Bf16Products`] scope, else candle's own. One operand may be a bf16 frozen weight with the other f32:
/// the result is f32 (outside the scope the weight is converted for the product).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_ready(a, b).map(Ready::into_tensor)
}

/// [`matmul`], its bf16 product as values ready to be tied.
pub(super) fn matmul_ready(a: &Tensor, b: &Tensor) -> Result<Ready> {
    let leading = |t: &Tensor| t.dims()[..t.rank().max(2) - 2].to_vec();
    let batch_dims = if a.rank() > 2 { leading(a) } else { leading(b) };
    let product_dtypes = matches!(
        (a.dtype(), b.dtype()),
        (DType::F32, DType::F32) | (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
    );
    // Two bf16 operands (a gradient kept in bf16 and a frozen weight) multiply on the tiles too.
    let both_bf16 = a.dtype() == DType::BF16 && b.dtype() == DType::BF16;
    let eligible = bf16_products()
        && a.device().is_cpu()
        && (product_dtypes || both_bf16)
        && a.rank() >= 2
        && b.rank() >= 2
        && (a.rank() == 2 || leading(a) == batch_dims)
        && (b.rank() == 2 || leading(b) == batch_dims)
        && last_two(a).1 == last_two(b).0;
    if !eligible {
        // A weight stored in bf16 meets its f32 operand in f32 (`to_dtype` to the same dtype is free).
        let dtype = if product_dtypes {
            DType::F32
        } else {
            a.dtype()
        };
        return Ok(Ready::Tensor(
            a.to_dtype(dtype)?.broadcast_matmul(&b.to_dtype(dtype)?)?,
        ));
    }
    let ((m, k), (_, n)) = (last_two(a), last_two(b));
    let batch: usize = batch_dims.iter().product();
    let (a, b) = (batched_view(a)?, batched_view(b)?);
    let mut product = Vec::with_capacity(batch * m * n);
    {
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (a_data, b_data) = (operand_values(&a_storage)?, operand_values(&b_storage)?);
        let matrices = product.spare_capacity_mut().chunks_mut((m * n).max(1));
        for (index, out) in matrices.enumerate().take(batch) {
            let left = matrix(a_data, a_layout, index)?;
            let right = matrix(b_data, b_layout, index)?;
            amx::product_into_uninit((m, k, n), (left, right.into()), out, true);
        }
    }
    // SAFETY: each of the `batch` products wrote all of its `m·n` values.
    unsafe { product.set_len(batch * m * n) };
    let mut shape = batch_dims;
    shape.extend([m, n]);
    Ok(Ready::Cpu(CpuStorage::F32(product), shape.into()))
}

/// `a·b + c·d` for matrices `a` `[m, k]`, `b` `[k, n]`, `c` `[m, j]`, `d` `[j, n]` in bf16 products, the
/// second product summed in the first one's tiles ([`amx::joined_product_into_uninit`]): a layer's frozen
/// product with its adapter's low-rank term, at the cost of the frozen product alone. The `[m, n]` result
/// comes as values ready to be tied. `None` outside a [`Bf16Products`] scope, for tensors that are not f32
/// or bf16 on the CPU, or for a `k` that is not a multiple of 32.
pub(crate) fn joined_matmul(
    a: &Tensor,
    b: &Right,
    c: &Tensor,
    d: &Tensor,
) -> Result<Option<Ready>> {
    let operands = [a, c, d];
    let eligible = bf16_products() && operands.iter().all(|t| product_operand(t)) && b.eligible();
    if !eligible {
        return Ok(None);
    }
    let ((m, k), (k_b, n), (_, j)) = (last_two(a), b.dims(), last_two(c));
    if k % 32 != 0 || k_b != k || last_two(c).0 != m || last_two(d) != (j, n) {
        return Ok(None);
    }
    let mut product = Vec::with_capacity(m * n);
    {
        let [a, c, d] = operands.map(|t| t.storage_and_layout());
        let (a, c, d) = (view(&a.0, a.1)?, view(&c.0, c.1)?, view(&d.0, d.1)?);
        b.with_source(|b| {
            amx::joined_product_into_uninit(
                (m, k, j, n),
                ((a, b), (c, d)),
                product.spare_capacity_mut(),
                true,
            );
            Ok(())
        })?;
    }
    // SAFETY: the product wrote all of its `m·n` values.
    unsafe { product.set_len(m * n) };
    Ok(Some(Ready::Cpu(CpuStorage::F32(product), (m, n).into())))
}

/// `a·b`, plus `c·d` summed in the same tiles when given (as [`joined_matmul`]), plus `bias` (`[n]` f32) on
/// every row, in bf16 products and rounded to bf16: an `[m, n]` bf16 tensor for a result that only feeds
/// further bf16 products (a feed-forward's projection, kept in bf16), never held in f32. `None` where
/// [`joined_matmul`] would be (and for a bias that is not `n` f32 values on the CPU).
pub(crate) fn rounded_matmul(
    (a, b): (&Tensor, &Right),
    low_rank: Option<(&Tensor, &Tensor)>,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mut operands = vec![a];
    operands.extend(low_rank.iter().flat_map(|&(c, d)| [c, d]));
    let eligible = bf16_products() && operands.iter().all(|t| product_operand(t)) && b.eligible();
    if !eligible {
        return Ok(None);
    }
    let ((m, k), (k_b, n)) = (last_two(a), b.dims());
    let j = match low_rank {
        Some((c, d)) => {
            let (rows, j) = last_two(c);
            if k % 32 != 0 || rows != m || last_two(d) != (j, n) {
                return Ok(None);
            }
            j
        }
        None => 0,
    };
    let bias = match bias {
        Some(bias)
            if bias.dims() != [n] || bias.dtype() != DType::F32 || !bias.device().is_cpu() =>
        {
            return Ok(None);
        }
        bias => bias.map(Tensor::contiguous).transpose()?,
    };
    if k_b != k {
        return Ok(None);
    }
    let mut product: Vec<half::bf16> = Vec::with_capacity(m * n);
    {
        let storages: Vec<_> = operands.iter().map(|t| t.storage_and_layout()).collect();
        let views = storages
            .iter()
            .map(|(storage, layout)| view(storage, layout))
            .collect::<Result<Vec<_>>>()?;
        let bias_storage = bias.as_ref().map(|bias| bias.storage_and_layout());
        let bias_values = match &bias_storage {
            Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => {
                    Some(&values[start..end])
                }
                _ => return Ok(None),
            },
            None => None,
        };
        let low_rank = (views.len() == 3).then(|| (views[1], views[2]));
        let out = product.spare_capacity_mut();
        // SAFETY: `bf16` is a `u16` in a transparent wrapper, and the product writes every value as bits.
        let out = unsafe {
            &mut *(out as *mut [std::mem::MaybeUninit<half::bf16>]
                as *mut [std::mem::MaybeUninit<u16>])
        };
        b.with_source(|b| {
            amx::rounded_product_into_uninit(
                (m, k, j, n),
                ((views[0], b), low_rank),
                bias_values,
                &mut out[..m * n],
            );
            Ok(())
        })?;
    }
    // SAFETY: the product wrote all of its `m·n` values.
    unsafe { product.set_len(m * n) };
    Ok(Some(
        Ready::Cpu(CpuStorage::BF16(product), (m, n).into()).into_tensor(),
    ))
}

/// The right operand of a product with a frozen weight: a tensor, or a weight stored in tile order, read
/// as `Wᵀ` or `W`.
pub(crate) enum Right<'a> {
    Tensor(Tensor),
    Tiles(TileView<'a>),
}

impl<'a> Right<'a> {
    /// `weight` (`[out, in]`) read as `Wᵀ` (a layer's forward product) or `W` (its input gradient).
    pub(crate) fn of_weight(weight: &'a FrozenWeight, orientation: Orientation) -> Result<Self> {
        if let Some(tiles) = weight.tiles(orientation) {
            return Ok(Right::Tiles(tiles));
        }
        let weight = weight.to_tensor()?;
        Ok(Right::Tensor(match orientation {
            Orientation::Transposed => weight.t()?,
            Orientation::Upright => weight,
        }))
    }

    /// `(rows, cols)` of the operand.
    fn dims(&self) -> (usize, usize) {
        match self {
            Right::Tensor(t) => last_two(t),
            Right::Tiles(tiles) => tiles.dims(),
        }
    }

    /// Whether the operand can go into bf16 products on AMX tiles.
    fn eligible(&self) -> bool {
        match self {
            Right::Tensor(t) => product_operand(t),
            Right::Tiles(_) => true,
        }
    }

    /// `f` given the operand's values.
    fn with_source<R>(&self, f: impl FnOnce(Source) -> Result<R>) -> Result<R> {
        match self {
            Right::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                f(view(&storage, layout)?.into())
            }
            Right::Tiles(tiles) => f((*tiles).into()),
        }
    }

    /// The operand as a tensor (tiled values copied out).
    fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Right::Tensor(t) => Ok(t.clone()),
            Right::Tiles(tiles) => tiles_tensor(*tiles),
        }
    }
}

/// `a · b` for `a` `[.., k]` and a frozen weight's operand `b` `[k, n]` (see [`matmul`]), as values ready
/// to be tied: a weight in tile order multiplies as it is stored in bf16 products, and as a bf16 tensor
/// outside them.
pub(crate) fn right_matmul(a: &Tensor, b: &Right) -> Result<Ready> {
    let tiles = match b {
        Right::Tensor(t) => return matmul_ready(a, t),
        Right::Tiles(tiles) => *tiles,
    };
    let (k, n) = tiles.dims();
    let eligible = bf16_products()
        && a.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && a.dims().last() == Some(&k);
    if !eligible {
        return matmul_ready(a, &b.to_tensor()?);
    }
    let m = a.elem_count() / k.max(1);
    let rows = a.reshape((m, k))?;
    let mut product = Vec::with_capacity(m * n);
    {
        let (storage, layout) = rows.storage_and_layout();
        let left = view(&storage, layout)?;
        let out = product.spare_capacity_mut();
        amx::product_into_uninit((m, k, n), (left, tiles.into()), out, true);
    }
    // SAFETY: the product wrote all of its `m·n` values.
    unsafe { product.set_len(m * n) };
    let mut dims = a.dims()[..a.rank() - 1].to_vec();
    dims.push(n);
    Ok(Ready::Cpu(CpuStorage::F32(product), dims.into()))
}

/// Whether a tensor can be an operand of bf16 products on AMX tiles as it is.
fn product_operand(t: &Tensor) -> bool {
    t.device().is_cpu() && t.rank() == 2 && matches!(t.dtype(), DType::F32 | DType::BF16)
}

/// A 2-D tensor's storage and layout as a product's operand.
fn view<'a>(storage: &'a Storage, layout: &Layout) -> Result<Operand<'a>> {
    matrix(operand_values(storage)?, layout, 0)
}

/// The last two dimensions of a tensor of rank 2 or more.
fn last_two(t: &Tensor) -> (usize, usize) {
    let dims = t.dims();
    (dims[dims.len() - 2], dims[dims.len() - 1])
}

/// `t` as it is when its leading dimensions flatten into one with a single stride, else a contiguous copy.
fn batched_view(t: &Tensor) -> Result<Tensor> {
    let (dims, strides) = (t.dims(), t.stride());
    let leading = dims.len() - 2;
    let flattens = (0..leading.saturating_sub(1))
        .all(|d| dims[d] == 1 || strides[d] == strides[d + 1] * dims[d + 1]);
    if flattens {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The values of a CPU storage as a product's operand: f32, or bf16 (a frozen weight stored in bf16).
pub(super) fn cpu_values(storage: &CpuStorage) -> Option<Values<'_>> {
    match storage {
        CpuStorage::F32(values) => Some(Values::F32(values)),
        CpuStorage::BF16(values) => Some(Values::Bf16(values.reinterpret_cast())),
        _ => None,
    }
}

/// [`cpu_values`] of a tensor's storage.
fn operand_values(storage: &Storage) -> Result<Values<'_>> {
    match storage {
        Storage::Cpu(storage) => cpu_values(storage),
        _ => None,
    }
    .ok_or_else(|| {
        candle_core::Error::Msg(
            "bf16 products: the operand is not an f32 or bf16 CPU tensor".into(),
        )
    })
}

/// Matrix `index` of a (batched, see [`batched_view`]) layout's last two dimensions; a matrix is its own
/// every index.
fn matrix<'a>(data: Values<'a>, layout: &Layout, index: usize) -> Result<Operand<'a>> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let rank = dims.len();
    let batch_stride = if rank > 2 { strides[rank - 3] } else { 0 };
    let index = if rank > 2 { index } else { 0 };
    let start = layout.start_offset() + index * batch_stride;
    let Some(data) = data.starting_at(start) else {
        candle_core::bail!("bf16 products: the operand's view lies outside its storage");
    };
    Ok(Operand {
        data,
        row_stride: strides[rank - 2],
        col_stride: strides[rank - 1],
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::*;
    use crate::test_support::{pseudo_random as values, relative_difference as relative};

    /// A layer under test: its inputs to its output.
    type Layer<'a> = dyn Fn(&[Tensor]) -> Tensor + 'a;

    /// A layer's output and its input gradients (for a fixed output gradient), in this thread's arithmetic.
    fn run(layer: &Layer<'_>, inputs: &[Tensor]) -> Vec<Tensor> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let output = layer(&tensors);
        let weights = values(output.dims(), 0.3);
        let grads = (&output * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut results = vec![output.detach()];
        results.extend(vars.iter().filter_map(|v| grads.get(v).cloned()));
        results
    }

    /// `a · b` of the operands rounded to bf16, in f32.
    fn rounded_product(a: &Tensor, b: &Tensor) -> Tensor {
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .and_then(|t| t.to_dtype(DType::F32))
                .unwrap()
        };
        round(a).broadcast_matmul(&round(b)).unwrap()
    }

    /// The frozen linear layer of weight `t[1]` on the input `t[0]`.
    fn frozen_linear_of(t: &[Tensor]) -> Tensor {
        super::super::frozen_linear(&t[0], t[1].detach()).unwrap()
    }

    /// The frozen convolution of kernel `t[1]` on the input `t[0]`, with `padding` and `stride`.
    fn frozen_conv_of(padding: usize, stride: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| super::super::frozen_conv2d(&t[0], &t[1].detach(), None, padding, stride).unwrap()
    }

    #[test]
    fn bf16_products_round_the_operands_only_inside_their_scope() {
        let (a, b) = (values(&[2, 45, 70], 0.1), values(&[70, 33], 0.7));
        let exact = a.broadcast_matmul(&b).unwrap();
        assert_eq!(relative(&matmul(&a, &b).unwrap(), &exact), 0.0);
        let Some(scope) = Bf16Products::enter() else {
            // Without AMX there is no scope: products stay f32.
            assert!(!amx::available());
            assert_eq!(product_arithmetic(), "f32");
            return;
        };
        assert_eq!(product_arithmetic(), "bf16");
        let product = matmul(&a, &b).unwrap();
        assert!(
            relative(&product, &exact) > 1e-4,
            "the operands were not rounded"
        );
        // A batch times a matrix, a matrix times a batch, and a transposed view: each the f32 product of
        // the rounded operands but for the order of the sums.
        let batch = values(&[3, 70, 20], 0.2);
        let left = values(&[45, 70], 0.9);
        let t = values(&[33, 70], 0.4).t().unwrap();
        for (a, b) in [(&a, &b), (&left, &batch), (&a, &t)] {
            let error = relative(&matmul(a, b).unwrap(), &rounded_product(a, b));
            assert!(
                error < 1e-5,
                "{:?} x {:?} off by {error}",
                a.dims(),
                b.dims()
            );
        }
        // Other threads keep f32 products.
        let elsewhere = std::thread::scope(|s| s.spawn(|| matmul(&a, &b).unwrap()).join().unwrap());
        assert_eq!(relative(&elsewhere, &exact), 0.0);
        drop(scope);
        assert_eq!(product_arithmetic(), "f32");
        assert_eq!(relative(&matmul(&a, &b).unwrap(), &exact), 0.0);
    }

    #[test]
    fn kernels_in_bf16_products_stay_within_bf16_rounding_of_f32() {
        let linear = frozen_linear_of;
        let (conv3, conv1, strided) = (
            frozen_conv_of(1, 1),
            frozen_conv_of(0, 1),
            frozen_conv_of(1, 2),
        );
        let attention =
            |t: &[Tensor]| super::super::fused_attention(&t[0], &t[1], &t[2], 2, 0.125).unwrap();
        let cases: [(&str, &Layer<'_>, Vec<Tensor>); 5] = [
            (
                "linear",
                &linear,
                vec![values(&[2, 50, 96], 0.1), values(&[80, 96], 0.5)],
            ),
            (
                "3x3 conv",
                &conv3,
                vec![values(&[1, 24, 32, 32], 0.2), values(&[40, 24, 3, 3], 0.6)],
            ),
            (
                "1x1 conv",
                &conv1,
                vec![values(&[1, 48, 8, 8], 0.3), values(&[40, 48, 1, 1], 0.7)],
            ),
            (
                "strided conv",
                &strided,
                vec![values(&[1, 16, 17, 17], 0.4), values(&[16, 16, 3, 3], 0.8)],
            ),
            (
                "attention",
                &attention,
                vec![
                    values(&[1, 70, 128], 0.1),
                    values(&[1, 45, 128], 0.2),
                    values(&[1, 45, 128], 0.3),
                ],
            ),
        ];
        for (name, layer, inputs) in cases {
            let exact = run(layer, &inputs);
            let Some(_scope) = Bf16Products::enter() else {
                assert!(!amx::available(), "a scope exists wherever AMX does");
                continue;
            };
            let rounded = run(layer, &inputs);
            for (index, (r, e)) in rounded.iter().zip(&exact).enumerate() {
                let error = relative(r, e);
                assert!(error > 0.0, "{name}: result {index} is not a bf16 product");
                assert!(error < 1e-2, "{name}: result {index} off by {error}");
            }
        }
    }

    #[test]
    fn frozen_weights_stored_in_bf16_compute_as_their_f32_values() {
        let linear = frozen_linear_of;
        let affine = |t: &[Tensor]| {
            let bias = values(&[80], 0.9);
            super::super::frozen_affine(&t[0], t[1].detach(), &bias).unwrap()
        };
        let (conv3, conv1, strided) = (
            frozen_conv_of(1, 1),
            frozen_conv_of(0, 1),
            frozen_conv_of(1, 2),
        );
        let cases: [(&str, &Layer<'_>, [Vec<usize>; 2]); 5] = [
            ("linear", &linear, [vec![2, 50, 96], vec![80, 96]]),
            ("affine", &affine, [vec![3, 96], vec![80, 96]]),
            (
                "3x3 conv",
                &conv3,
                [vec![1, 24, 32, 32], vec![40, 24, 3, 3]],
            ),
            ("1x1 conv", &conv1, [vec![1, 48, 8, 8], vec![40, 48, 1, 1]]),
            (
                "strided conv",
                &strided,
                [vec![1, 16, 17, 17], vec![16, 16, 3, 3]],
            ),
        ];
        for (name, layer, [input_dims, weight_dims]) in cases {
            let input = values(&input_dims, 0.2);
            let stored = values(&weight_dims, 0.6).to_dtype(DType::BF16).unwrap();
            let widened = stored.to_dtype(DType::F32).unwrap();
            // f32 products widen the weight, bf16 products read it as it is: either way the results are
            // those of its f32 values, to the last bit.
            for products in [None, Bf16Products::enter()] {
                let arithmetic = product_arithmetic();
                let from_bf16 = run(layer, &[input.clone(), stored.clone()]);
                let from_f32 = run(layer, &[input.clone(), widened.clone()]);
                assert_eq!(
                    from_bf16.len(),
                    2,
                    "{name}: an output and an input gradient"
                );
                for (index, (a, b)) in from_bf16.iter().zip(&from_f32).enumerate() {
                    assert_eq!(
                        a.dtype(),
                        DType::F32,
                        "{name} in {arithmetic}: result {index}"
                    );
                    let error = relative(a, b);
                    assert_eq!(
                        error, 0.0,
                        "{name} in {arithmetic}: result {index} off by {error}"
                    );
                }
                drop(products);
            }
        }
    }

    #[test]
    fn frozen_linear_in_bf16_products_is_the_product_of_the_rounded_operands() {
        let (x, weight) = (values(&[2, 50, 96], 0.1), values(&[80, 96], 0.5));
        let Some(_scope) = Bf16Products::enter() else {
            assert!(!amx::available(), "a scope exists wherever AMX does");
            return;
        };
        let [output, grad] = &run(
            &|t: &[Tensor]| super::super::frozen_linear(&t[0], &weight).unwrap(),
            std::slice::from_ref(&x),
        )[..] else {
            panic!("one output and one gradient");
        };
        let error = relative(output, &rounded_product(&x, &weight.t().unwrap()));
        assert!(error < 1e-5, "output off by {error}");
        let output_grad = values(output.dims(), 0.3);
        let error = relative(grad, &rounded_product(&output_grad, &weight));
        assert!(error < 1e-5, "input gradient off by {error}");
    }
}
