//! Training configuration: the `TrainConfig` type, reading JSON/TOML/YAML files with `--set` overrides
//! (kohya's and LLaMA-Factory's names included), validation, and the versioned form in which the app and checkpoints store it. Plain data and serde only;
//! must not use candle or egui.

mod device_choice;
mod kohya;
mod kohya_dataset;
mod llama_factory;
mod llama_factory_dataset;
mod load;
pub mod stored;
mod train_config;
mod validate;

pub use device_choice::DeviceChoice;
pub use load::{
    ConfigError, LoadedConfig, config_from_text, load_config, load_config_noting, save_config,
};
pub use stored::{CONFIG_VERSION, RestoredConfig, restore_config, stored_config};
pub use train_config::{
    AlphaMode, LANGUAGE_MODEL_TARGETS, LogWith, LrScheduler, MixedPrecision, OptimizerKind,
    PredictionOverride, SD_RESOLUTION, SDXL_RESOLUTION, SavePrecision, TrainConfig,
};
pub use validate::{validate, validate_resolution};
