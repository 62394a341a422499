//! Ops whose result is computed on detached tensors and then tied to the inputs its backward pass
//! differentiates: the forward pass hands the result (the first operand) through unchanged, and the
//! backward half is the op's own. Frozen layers, fused attention, normalisation, GEGLU, LoRA linears and
//! checkpointed blocks are all built this way; here is the forward half they share.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Tensor,
};

/// The forward pass of a tied op: the result, unchanged (one copy). `what` names the op in the error.
fn pass_through<S: BackendStorage>(storage: &S, layout: &Layout, what: &str) -> Result<(S, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("{what}: the result is not a fresh contiguous tensor");
    }
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

/// The backward half of an op tied to one input.
pub(crate) trait TiedBackward: Send + Sync + 'static {
    /// The op's name in the graph and in errors.
    fn name(&self) -> &'static str;
    /// `CustomOp2::bwd` with operands (result, input): the first gradient is ignored.
    fn bwd(
        &self,
        result: &Tensor,
        input: &Tensor,
        tied: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// The backward half of an op tied to two inputs.
pub(crate) trait TiedBackward2: Send + Sync + 'static {
    /// The op's name in the graph and in errors.
    fn name(&self) -> &'static str;
    /// `CustomOp3::bwd` with operands (result, first input, second input).
    fn bwd(
        &self,
        result: &Tensor,
        first: &Tensor,
        second: &Tensor,
        tied: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

/// `result` tied to `input` through `backward`.
pub(crate) fn tie(result: &Tensor, input: &Tensor, backward: impl TiedBackward) -> Result<Tensor> {
    result.apply_op2(input, Tied(backward))
}

/// `result` tied to `first` and `second` through `backward`.
pub(crate) fn tie2(
    result: &Tensor,
    first: &Tensor,
    second: &Tensor,
    backward: impl TiedBackward2,
) -> Result<Tensor> {
    result.apply_op3(first, second, Tied(backward))
}

struct Tied<B>(B);

impl<B: TiedBackward> CustomOp2 for Tied<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn bwd(
        &self,
        result: &Tensor,
        input: &Tensor,
        tied: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(result, input, tied, grad)
    }
}

impl<B: TiedBackward2> CustomOp3 for Tied<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        pass_through(s1, l1, self.0.name())
    }

    fn bwd(
        &self,
        result: &Tensor,
        first: &Tensor,
        second: &Tensor,
        tied: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(result, first, second, tied, grad)
    }
}
