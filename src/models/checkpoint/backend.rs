//! A `VarBuilder` backend that serves a model component's tensors from the files users have, under the
//! diffusers names the model code asks for.
//!
//! It renames (single-file layouts), unpacks (OpenCLIP's packed q/k/v), transposes (OpenCLIP's
//! `text_projection`), reshapes 1x1-conv weights stored for linear layers, converts the dtype, and turns a
//! missing or mis-shaped tensor into one sentence that names the file, the stored key and the component that
//! needed it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::names::{self, StoredName};
use crate::models::ModelError;
use crate::tensor_file::TensorFile;

/// One or more tensor files (sharded diffusers weights) seen as one.
#[derive(Debug)]
pub struct TensorFiles {
    files: Vec<TensorFile>,
    owner: HashMap<String, usize>,
}

impl TensorFiles {
    pub fn new(files: Vec<TensorFile>) -> Self {
        let owner = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.infos().keys().map(move |k| (k.clone(), i)))
            .collect();
        Self { files, owner }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.owner.contains_key(key)
    }

    pub fn file_of(&self, key: &str) -> Option<&TensorFile> {
        self.owner.get(key).map(|&i| &self.files[i])
    }

    /// The first file, for messages.
    pub fn display_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|f| f.path().to_path_buf())
            .unwrap_or_default()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.owner.keys()
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.file_of(key)?.info(key).map(|i| i.shape.as_slice())
    }
}

/// How a component's diffusers names map onto its stored keys.
#[derive(Debug, Clone)]
pub enum NameMap {
    /// diffusers folder: `prefix + name` (with the legacy VAE attention and un-prefixed CLIP fallbacks).
    Diffusers { prefix: String },
    /// Single-file UNet.
    LdmUnet {
        layers_per_block: usize,
        up_attention: Vec<bool>,
    },
    /// Single-file VAE.
    LdmVae { levels: usize },
    /// Single-file CLIP in transformers names under `prefix` (SD1's `cond_stage_model.transformer.`, SDXL's
    /// `conditioner.embedders.0.transformer.`).
    LdmClip { prefix: &'static str },
    /// Single-file OpenCLIP under `prefix` (SD2's `cond_stage_model.model.`, SDXL's
    /// `conditioner.embedders.1.model.`).
    OpenClip { prefix: &'static str, hidden: usize },
}

impl NameMap {
    /// The stored key (and row block) for a diffusers name, trying the known variants in order.
    pub fn resolve(&self, name: &str, files: &TensorFiles) -> Option<StoredName> {
        let candidates = self.candidates(name);
        let first = candidates.first().cloned();
        candidates
            .into_iter()
            .find(|c| files.contains(&c.key))
            .or(first)
    }

    /// The key a file in this layout stores a diffusers name under (the first of the known variants), for
    /// writing one.
    pub fn primary(&self, name: &str) -> Option<StoredName> {
        self.candidates(name).into_iter().next()
    }

    fn candidates(&self, name: &str) -> Vec<StoredName> {
        match self {
            NameMap::Diffusers { prefix } => {
                let mut keys = vec![format!("{prefix}{name}")];
                if let Some(legacy) = names::vae_legacy_attention_name(name) {
                    keys.push(format!("{prefix}{legacy}"));
                }
                if let Some(flat) = name.strip_prefix("text_model.") {
                    keys.push(format!("{prefix}{flat}"));
                }
                keys.into_iter().map(StoredName::whole).collect()
            }
            NameMap::LdmUnet {
                layers_per_block,
                up_attention,
            } => names::unet_to_ldm(name, *layers_per_block, up_attention)
                .map(|key| StoredName::whole(format!("{}{key}", names::LDM_UNET)))
                .into_iter()
                .collect(),
            NameMap::LdmVae { levels } => names::vae_to_ldm(name, *levels)
                .map(|key| StoredName::whole(format!("{}{key}", names::LDM_VAE)))
                .into_iter()
                .collect(),
            NameMap::LdmClip { prefix } => {
                let mut keys = vec![format!("{prefix}{name}")];
                if let Some(flat) = name.strip_prefix("text_model.") {
                    keys.push(format!("{prefix}{flat}"));
                }
                keys.into_iter().map(StoredName::whole).collect()
            }
            NameMap::OpenClip { prefix, hidden } => names::clip_to_open_clip(name, *hidden)
                .map(|stored| StoredName {
                    key: format!("{prefix}{}", stored.key),
                    ..stored
                })
                .into_iter()
                .collect(),
        }
    }
}

/// The tensors of one component (UNet, VAE or text encoder) for `VarBuilder::from_backend`.
pub struct ComponentBackend {
    files: Arc<TensorFiles>,
    names: NameMap,
    component: String,
    first_error: Arc<Mutex<Option<ModelError>>>,
}

impl ComponentBackend {
    /// `first_error` receives the first structured error, which the caller reports instead of candle's.
    pub fn new(
        files: Arc<TensorFiles>,
        names: NameMap,
        component: &str,
        first_error: Arc<Mutex<Option<ModelError>>>,
    ) -> Self {
        Self {
            files,
            names,
            component: component.to_string(),
            first_error,
        }
    }

    fn fail(&self, error: ModelError) -> candle_core::Error {
        let message = error.to_string();
        let mut slot = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(error);
        }
        candle_core::Error::Msg(message)
    }

    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(stored) = self.names.resolve(name, &self.files) else {
            return Err(self.fail(ModelError::Config(format!(
                "the {} asks for `{name}`, which has no counterpart in this checkpoint layout",
                self.component
            ))));
        };
        let Some(file) = self.files.file_of(&stored.key) else {
            return Err(self.fail(ModelError::MissingTensor {
                path: self.files.display_path(),
                tensor: stored.key,
                component: self.component.clone(),
            }));
        };
        let mut tensor = file
            .load(&stored.key, device)
            .map_err(|e| self.fail(e.into()))?;
        if let Some((start, len)) = stored.rows {
            tensor = tensor.narrow(0, start, len).map_err(|_| {
                self.fail(ModelError::ShapeMismatch {
                    path: self.files.display_path(),
                    tensor: stored.key.clone(),
                    component: self.component.clone(),
                    found: tensor.dims().to_vec(),
                    expected: expected.map(|s| s.dims().to_vec()).unwrap_or_default(),
                })
            })?;
        }
        if stored.transposed {
            tensor = tensor.t()?.contiguous()?;
        }
        if let Some(expected) = expected
            && tensor.dims() != expected.dims()
        {
            let squeezed = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
            if tensor.elem_count() == expected.elem_count()
                && squeezed(tensor.dims()) == squeezed(expected.dims())
            {
                tensor = tensor.reshape(expected)?;
            } else {
                return Err(self.fail(ModelError::ShapeMismatch {
                    path: self.files.display_path(),
                    tensor: stored.key,
                    component: self.component.clone(),
                    found: tensor.dims().to_vec(),
                    expected: expected.dims().to_vec(),
                }));
            }
        }
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for ComponentBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names
            .resolve(name, &self.files)
            .is_some_and(|s| self.files.contains(&s.key))
    }
}
