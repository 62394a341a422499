//! A frozen linear layer's weight as the kernels read it: a tensor, or — for a run in bf16 products on AMX
//! — bf16 values kept in the tile order of the products that read them ([`super::amx::TiledWeight`]), so
//! that neither the forward product nor the input gradient packs the weight again each step. Code outside
//! the products (adapters that need the weight's values, exports, merges) gets it back as a tensor.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Storage, Tensor};

use super::amx::{self, Orientation, TileView, TiledWeight};
use super::products::cpu_values;

/// A frozen layer's weight `[out, in]`.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Tensor(Tensor),
    Tiled(Arc<TiledWeight>),
}

impl FrozenWeight {
    /// `weight` (`[out, in]`, f32 or bf16 on the CPU) in bf16 tile order, where the CPU kernels run bf16
    /// products on AMX tiles; `None` elsewhere.
    pub fn tiled(weight: &Tensor) -> Result<Option<Self>> {
        let eligible = amx::available()
            && super::cpu_kernels(weight.device())
            && weight.rank() == 2
            && matches!(weight.dtype(), DType::F32 | DType::BF16);
        if !eligible {
            return Ok(None);
        }
        let dims = weight.dims2()?;
        let weight = weight.contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let (Storage::Cpu(storage), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let Some(values) = cpu_values(storage).and_then(|values| values.starting_at(start)) else {
            return Ok(None);
        };
        debug_assert_eq!(end - start, dims.0 * dims.1);
        Ok(Some(Self::Tiled(Arc::new(TiledWeight::new(values, dims)))))
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Tensor(weight) => weight.dims2(),
            FrozenWeight::Tiled(tiles) => Ok(tiles.dims()),
        }
    }

    /// The weight as a tensor: the one held, or the tiled values as a bf16 CPU tensor (a copy).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Tensor(weight) => Ok(weight.clone()),
            FrozenWeight::Tiled(tiles) => tiles_tensor(tiles.read_as(Orientation::Upright)),
        }
    }

    /// The tiled values read as `Wᵀ` or `W`, when the weight is tiled.
    pub(super) fn tiles(&self, orientation: Orientation) -> Option<TileView<'_>> {
        match self {
            FrozenWeight::Tensor(_) => None,
            FrozenWeight::Tiled(tiles) => Some(tiles.read_as(orientation)),
        }
    }
}

impl From<Tensor> for FrozenWeight {
    fn from(weight: Tensor) -> Self {
        FrozenWeight::Tensor(weight)
    }
}

impl From<&Tensor> for FrozenWeight {
    fn from(weight: &Tensor) -> Self {
        FrozenWeight::Tensor(weight.clone())
    }
}

impl From<&FrozenWeight> for FrozenWeight {
    fn from(weight: &FrozenWeight) -> Self {
        weight.clone()
    }
}

/// Tiled values as read, copied into a bf16 CPU tensor.
pub(super) fn tiles_tensor(tiles: TileView) -> Result<Tensor> {
    let values = tiles.row_major().into_iter().map(half::bf16::from_bits);
    Tensor::from_vec(values.collect(), tiles.dims(), &Device::Cpu)
}
