//! Ops whose result is computed on detached tensors and then tied to the inputs its backward pass
//! differentiates. Frozen layers, fused attention, normalisation, GEGLU, LoRA linears and checkpointed
//! blocks are all built this way; here is the forward half they share.
//!
//! The tied op holds the result until its forward pass, which hands it over as the op's output and lets
//! it go. The graph therefore keeps the result once, as the op's output; passed as an operand instead, it
//! would stay alive a second time until the backward pass ends. A result given as a tensor is copied into
//! the output (candle has no way to move a tensor's storage out); values computed on the CPU by the
//! project's own kernels ([`Ready::Cpu`]) are moved.

use std::sync::{Mutex, PoisonError};

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

/// `result` tied to one, two or three `inputs` through `backward`; returned as it is when no input is
/// part of a graph.
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
    let op = Tied {
        backward,
        result: Mutex::new(Some(result)),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("{name}: ties one to three inputs, not {}", inputs.len()),
    }
}

struct Tied<B> {
    backward: B,
    /// The result until the forward pass hands it over.
    result: Mutex<Option<Ready>>,
}

impl<B: TiedBackward> Tied<B> {
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
