//! Ops whose result is computed on detached tensors and then tied to the inputs its backward pass
//! differentiates. Frozen layers, fused attention, normalisation, GEGLU, LoRA linears and checkpointed
//! blocks are all built this way; here is the forward half they share.
//!
//! The tied op holds the result until its forward pass, which hands it over as the op's output and lets
//! it go. The graph therefore keeps the result once, as the op's output; passed as an operand instead, it
//! would stay alive a second time until the backward pass ends. A result given as a tensor is copied into
//! the output (candle has no way to move a tensor's storage out); values computed on the CPU by the
//! project's own kernels ([`Ready::Cpu`]) are moved.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};

/// The backward half of a tied op.
pub(crate) trait TiedBackward: Send + Sync + 'static {
    /// The op's name in the graph and in errors.
    fn name(&self) -> &'static str;
    /// The gradients of `inputs` (in the order given to [`tie`]) from the gradient `grad` of `output`.
    fn bwd(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>>;
}

/// A result computed before its tied op runs.
pub(crate) enum Ready {
    /// A tensor (contiguous, not a view into a larger one), copied into the op's output.
    Tensor(Tensor),
    /// Values on the CPU and their shape, moved into the op's output.
    Cpu(CpuStorage, Shape),
}

impl From<Tensor> for Ready {
    fn from(tensor: Tensor) -> Self {
        Ready::Tensor(tensor)
    }
}

impl Ready {
    /// The result of `op` on `input`'s CPU storage, kept as it came out of the op (a tensor made of it
    /// would have to be copied into the tied op's output).
    pub(crate) fn from_cpu_op(input: &Tensor, op: &impl CustomOp1) -> Result<Self> {
        let (storage, layout) = input.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("{}: the input is not on the CPU", op.name());
        };
        let (values, shape) = op.cpu_fwd(storage, layout)?;
        Ok(Ready::Cpu(values, shape))
    }

    /// The number of values.
    pub(crate) fn elem_count(&self) -> usize {
        match self {
            Ready::Cpu(_, shape) => shape.elem_count(),
            Ready::Tensor(tensor) => tensor.elem_count(),
        }
    }

    /// The same values in the shape `dims` (of as many elements).
    pub(crate) fn reshaped(self, dims: &[usize]) -> Result<Self> {
        match self {
            Ready::Cpu(values, shape) => {
                if shape.elem_count() != dims.iter().product::<usize>() {
                    candle_core::bail!("cannot reshape {shape:?} to {dims:?}");
                }
                Ok(Ready::Cpu(values, dims.into()))
            }
            Ready::Tensor(tensor) => Ok(Ready::Tensor(tensor.reshape(dims)?)),
        }
    }

    pub(crate) fn into_tensor(self) -> Tensor {
        match self {
            Ready::Tensor(tensor) => tensor,
            Ready::Cpu(storage, shape) => {
                Tensor::from_storage(Storage::Cpu(storage), shape, BackpropOp::none(), false)
            }
        }
    }
}

/// `result` tied to one or more `inputs` through `backward`; returned as it is when no input is part of a
/// graph.
///
/// candle's ops take at most three operands. More inputs are tied in two ops: all but the last two are
/// tied to a one-value handle, and the result to the last two and the handle. The backward pass reaches
/// the result's op first (the handle is its operand): it computes every gradient there and hands the
/// leading inputs' ones to the handle's op, which returns them when the pass reaches it.
pub(crate) fn tie(
    result: impl Into<Ready>,
    inputs: &[&Tensor],
    backward: impl TiedBackward,
) -> Result<Tensor> {
    let result = result.into();
    if !inputs.iter().any(|input| input.track_op()) {
        return Ok(result.into_tensor());
    }
    let name = backward.name();
    match inputs {
        [a] => a.apply_op1(Tied::new(backward, result)),
        [a, b] => a.apply_op2(b, Tied::new(backward, result)),
        [a, b, c] => a.apply_op3(b, c, Tied::new(backward, result)),
        [leading @ .., b, c] => {
            let handed = Arc::new(Mutex::new(None));
            let placeholder = Tensor::zeros(1, leading[0].dtype(), b.device())?;
            let handle = tie(
                placeholder,
                leading,
                HandedGradients {
                    name,
                    handed: handed.clone(),
                },
            )?;
            let whole = Gathered {
                backward,
                leading: leading.iter().map(|&t| t.clone()).collect(),
                handed: handle.track_op().then_some(handed),
            };
            b.apply_op3(c, &handle, Tied::new(whole, result))
        }
        [] => candle_core::bail!("{name}: ties no input"),
    }
}

/// Gradients computed by a [`Gathered`] op for the inputs of a handle, until the handle's op takes them.
type Handed = Arc<Mutex<Option<Vec<Option<Tensor>>>>>;

/// The backward pass of an op with more than three inputs, tied to the last two and a handle of the others.
struct Gathered<B> {
    backward: B,
    /// The inputs behind the handle (held by the handle's op as well: no copy).
    leading: Vec<Tensor>,
    /// Where their gradients go; `None` when the handle is not part of a graph.
    handed: Option<Handed>,
}

impl<B: TiedBackward> TiedBackward for Gathered<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn bwd(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let [last_two @ .., handle] = inputs else {
            candle_core::bail!("{}: no handle among the inputs", self.name());
        };
        let all: Vec<&Tensor> = self
            .leading
            .iter()
            .chain(last_two.iter().copied())
            .collect();
        let mut grads = self.backward.bwd(&all, output, grad)?;
        if grads.len() != all.len() {
            candle_core::bail!(
                "{}: {} gradients for {} inputs",
                self.name(),
                grads.len(),
                all.len()
            );
        }
        let mut own = grads.split_off(self.leading.len());
        if let Some(handed) = &self.handed {
            *handed.lock().unwrap_or_else(PoisonError::into_inner) = Some(grads);
        }
        own.push(Some(handle.zeros_like()?));
        Ok(own)
    }
}

/// The backward pass of a handle: the gradients its [`Gathered`] op computed.
struct HandedGradients {
    name: &'static str,
    handed: Handed,
}

impl TiedBackward for HandedGradients {
    fn name(&self) -> &'static str {
        self.name
    }

    fn bwd(&self, _: &[&Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = self
            .handed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        grads.ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: the gradients of the leading inputs were not computed",
                self.name
            ))
        })
    }
}

struct Tied<B> {
    backward: B,
    /// The result until the forward pass hands it over.
    result: Mutex<Option<Ready>>,
}

impl<B: TiedBackward> Tied<B> {
    fn new(backward: B, result: Ready) -> Self {
        Self {
            backward,
            result: Mutex::new(Some(result)),
        }
    }

    fn take(&self) -> Result<Ready> {
        let result = self
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        result.ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: the result was handed over already",
                self.backward.name()
            ))
        })
    }

    /// The result as the output storage of an op on the CPU: moved, or copied from a tensor.
    fn hand_over_cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            Ready::Cpu(storage, shape) => Ok((storage, shape)),
            Ready::Tensor(result) => self.copy_out(&result, cpu),
        }
    }

    /// The result as the output storage of an op on another device, which `select` picks.
    fn hand_over<S: BackendStorage>(
        &self,
        select: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        match self.take()? {
            Ready::Tensor(result) => self.copy_out(&result, select),
            Ready::Cpu(..) => candle_core::bail!(
                "{}: the result is on the CPU, the inputs are not",
                self.backward.name()
            ),
        }
    }

    /// A copy of `result`'s storage, the device's own picked by `select`.
    fn copy_out<S: BackendStorage>(
        &self,
        result: &Tensor,
        select: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let name = self.backward.name();
        let (storage, layout) = result.storage_and_layout();
        let Some(storage) = select(&storage) else {
            candle_core::bail!("{name}: the result is on another device than the inputs");
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{name}: the result is not a fresh contiguous tensor");
        }
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn gradients<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grads = self.backward.bwd(&inputs, output, grad)?;
        let count = grads.len();
        grads.try_into().map_err(|_| {
            candle_core::Error::Msg(format!(
                "{}: {count} gradients for {N} inputs",
                self.backward.name()
            ))
        })
    }
}

fn cpu(storage: &Storage) -> Option<&CpuStorage> {
    match storage {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

fn cuda(storage: &Storage) -> Option<&CudaStorage> {
    match storage {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

fn metal(storage: &Storage) -> Option<&MetalStorage> {
    match storage {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

impl<B: TiedBackward> CustomOp1 for Tied<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.hand_over_cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(&self, input: &Tensor, output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [grad] = self.gradients([input], output, grad)?;
        Ok(grad)
    }
}

impl<B: TiedBackward> CustomOp2 for Tied<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.hand_over_cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(
        &self,
        first: &Tensor,
        second: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [first, second] = self.gradients([first, second], output, grad)?;
        Ok((first, second))
    }
}

impl<B: TiedBackward> CustomOp3 for Tied<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.hand_over_cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(
        &self,
        first: &Tensor,
        second: &Tensor,
        third: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [first, second, third] = self.gradients([first, second, third], output, grad)?;
        Ok((first, second, third))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::{Ready, TiedBackward, tie};

    /// `Σ (i + 1)·xᵢ` over inputs of one shape.
    struct WeightedSum;

    impl TiedBackward for WeightedSum {
        fn name(&self) -> &'static str {
            "weighted-sum"
        }

        fn bwd(
            &self,
            inputs: &[&Tensor],
            _: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            (0..inputs.len())
                .map(|i| (grad * (i + 1) as f64).map(Some))
                .collect()
        }
    }

    #[test]
    fn any_number_of_inputs_get_their_gradients() {
        for count in 1..=7 {
            let vars: Vec<Var> = (0..count)
                .map(|i| Var::new(&[i as f64, 1.0], &Device::Cpu).unwrap())
                .collect();
            // One input outside the graph, among the leading ones when there are any.
            let constant = Tensor::new(&[5.0f64, 6.0], &Device::Cpu).unwrap();
            let mut inputs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            inputs.insert(0, &constant);
            let mut sum = Tensor::zeros(2, candle_core::DType::F64, &Device::Cpu).unwrap();
            for (i, input) in inputs.iter().enumerate() {
                sum = (sum + (*input * (i + 1) as f64).unwrap()).unwrap();
            }
            let tied = tie(Ready::Tensor(sum.detach()), &inputs, WeightedSum).unwrap();
            assert_eq!(
                tied.to_vec1::<f64>().unwrap(),
                sum.to_vec1::<f64>().unwrap()
            );
            let grads = (&tied * Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, var) in vars.iter().enumerate() {
                let factor = (i + 2) as f64;
                let grad = grads.get(var).unwrap().to_vec1::<f64>().unwrap();
                assert_eq!(grad, [factor, 2.0 * factor], "input {i} of {count}");
            }
        }
    }
}
