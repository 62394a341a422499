//! Training configuration: the `TrainConfig` type, reading JSON/TOML/YAML files with `--set` overrides,
//! and validation. Plain data and serde only; must not use candle or egui.

mod device_choice;
mod kohya;
mod kohya_dataset;
mod load;
mod train_config;
mod validate;

pub use device_choice::DeviceChoice;
pub use load::{
    ConfigError, LoadedConfig, config_from_text, load_config, load_config_noting, save_config,
};
pub use train_config::{
    AlphaMode, LogWith, LrScheduler, MixedPrecision, OptimizerKind, PredictionOverride,
    SavePrecision, TrainConfig,
};
pub use validate::validate;
