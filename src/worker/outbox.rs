//! The workers' side of the event channel: send, then wake the UI.

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::messages::Event;

/// Sends events to the UI and wakes it.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<Event>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl Outbox {
    pub fn new(tx: Sender<Event>, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self { tx, wake }
    }

    pub fn send(&self, event: Event) {
        // The UI is gone when this fails; there is no one left to tell.
        let _ = self.tx.send(event);
        (self.wake)();
    }

    /// Reports an error with the usual fix for it, if one is known.
    pub fn error(&self, message: String) {
        let hint = hint_for(&message);
        self.send(Event::Error { message, hint });
    }
}

/// The lora-scripts troubleshooting table, matched on the error text.
pub fn hint_for(message: &str) -> Option<String> {
    let lower = message.to_lowercase();
    if lower.contains("out of memory")
        || lower.contains("out_of_memory")
        || lower.contains("memory allocation")
    {
        Some(
            "lower the batch size to 1-2 and the rank to 4-8, or turn on gradient checkpointing"
                .into(),
        )
    } else if lower.contains("non-finite") || lower.contains("nan") {
        Some("lower the learning rate (1e-4 is a safe start), or use bf16 instead of fp16".into())
    } else if lower.contains("no readable images") {
        Some("drop a folder of jpg, png, webp or bmp images".into())
    } else if lower.contains("base_model") || lower.contains("not a stable diffusion") {
        Some(
            "pick a Stable Diffusion 1.x/2.x checkpoint (.safetensors/.ckpt) or a diffusers folder"
                .into(),
        )
    } else if lower.contains("could not download") {
        Some(
            "without internet access, put the model folder (config.json, weights, vocab) on disk and \
             name the folder instead; HF_ENDPOINT points downloads at a mirror"
                .into(),
        )
    } else {
        None
    }
}
