//! The engine's chat: answers a [`ChatRequest`] with a loaded language model and the adapters it names —
//! the run in progress, a checkpoint of a language-model run, or a PEFT adapter folder — at the requested
//! strength, streaming [`Event::ChatToken`] pieces and ending each reply with [`Event::ChatReply`]. A
//! compare request answers with the base model first (the Base lane), then with the adapters. Whatever it
//! attaches is detached before it returns (the run's own adapters are put back at strength 1), and a reply
//! is abandoned between two tokens when `superseded` says a newer request waits. Must not load models.

use std::sync::Arc;

use anyhow::bail;

use super::Outbox;
use crate::chat::{ChatFiles, ChatMessage};
use crate::lora::{LayerRegistry, LoraAdapter, LoraNetwork, PeftAdapter, Rendering};
use crate::messages::{ChatLane, ChatRequest, Event, PreviewSource};
use crate::models::causal_lm::CausalLm;
use crate::train::language_network_from_checkpoint;
use crate::train::lm_chat::{SamplingChoice, generation_settings, reply};

/// Answers `request` with `model`; `live` is the network of the run in progress, if one trains.
pub fn answer(
    model: &CausalLm,
    files: &ChatFiles,
    live: Option<&LoraNetwork>,
    request: &ChatRequest,
    outbox: &Outbox,
    superseded: &mut dyn FnMut() -> bool,
) -> anyhow::Result<()> {
    let settings = &request.settings;
    if request.messages.is_empty() {
        bail!("the conversation has no message to answer");
    }
    let asked = SamplingChoice {
        temperature: Some(settings.temperature),
        ..SamplingChoice::default()
    };
    let generation = generation_settings(files, &asked, settings.max_new_tokens, settings.seed)?;
    let system = (!settings.system_prompt.trim().is_empty())
        .then(|| ChatMessage::new("system", settings.system_prompt.as_str()));
    let messages: Vec<ChatMessage> = system
        .into_iter()
        .chain(
            request
                .messages
                .iter()
                .map(|turn| ChatMessage::new(turn.role.as_str(), turn.content.as_str())),
        )
        .collect();
    let adapters = ChatAdapters::open(model, &request.source, live)?;
    let lanes: &[ChatLane] = if request.compare {
        &[ChatLane::Base, ChatLane::Adapter]
    } else {
        &[ChatLane::Adapter]
    };
    for &lane in lanes {
        let strength = match lane {
            ChatLane::Base => 0.0,
            ChatLane::Adapter => settings.strength,
        };
        let _applied = adapters.at_strength(strength);
        let answered = reply(model, files, &messages, &generation, |piece| {
            if !piece.is_empty() {
                outbox.send(Event::ChatToken {
                    id: request.id,
                    lane,
                    text: piece.to_string(),
                });
            }
            !superseded()
        })?;
        let Some(answered) = answered else {
            return Ok(()); // a newer request is waiting; it is answered next
        };
        outbox.send(Event::ChatReply {
            id: request.id,
            lane,
            text: answered.text,
            tokens: answered.new_tokens,
            seconds: answered.total_secs,
        });
    }
    Ok(())
}

/// The adapters a chat answers with, attached to the model for as long as this lives.
enum ChatAdapters<'a> {
    /// The run in progress (none: the base model alone).
    Live(Option<&'a LoraNetwork>),
    /// A checkpoint's network, rebuilt on the model; the run's network (if any) is muted meanwhile.
    Checkpoint {
        network: LoraNetwork,
        live: Option<&'a LoraNetwork>,
    },
    /// A PEFT adapter folder's modules; the run's network (if any) is muted meanwhile.
    Peft {
        attached: AttachedModules<'a>,
        live: Option<&'a LoraNetwork>,
    },
}

impl<'a> ChatAdapters<'a> {
    /// Attaches what `source` names (at strength 0 until [`ChatAdapters::at_strength`]).
    fn open(
        model: &'a CausalLm,
        source: &PreviewSource,
        live: Option<&'a LoraNetwork>,
    ) -> anyhow::Result<Self> {
        let PreviewSource::Checkpoint(folder) = source else {
            return Ok(Self::Live(live));
        };
        if folder.join("adapter_config.json").is_file() {
            let adapter = PeftAdapter::load(folder, model.device())?;
            let report = adapter.attach(model.layers(), 0.0, model.dtype())?;
            for attached in &report.adapters {
                attached.set_gradients(false);
            }
            let attached = AttachedModules {
                layers: model.layers(),
                adapters: report.adapters,
            };
            return Ok(Self::Peft { attached, live });
        }
        let (network, _) = language_network_from_checkpoint(model, folder)?;
        Ok(Self::Checkpoint { network, live })
    }

    /// Applies the adapters at `strength` (and mutes the run's network when it is not the one shown) until
    /// the guards returned are dropped.
    fn at_strength(&self, strength: f64) -> Vec<Rendering<'_>> {
        match self {
            Self::Live(live) => live.map(|n| n.rendering_at(strength)).into_iter().collect(),
            Self::Checkpoint { network, live } => std::iter::once(network.rendering_at(strength))
                .chain(live.map(|n| n.rendering_at(0.0)))
                .collect(),
            Self::Peft { attached, live } => {
                for adapter in &attached.adapters {
                    adapter.set_multiplier(strength);
                }
                live.map(|n| n.rendering_at(0.0)).into_iter().collect()
            }
        }
    }
}

/// Adapters attached from a file, detached again when this is dropped.
struct AttachedModules<'a> {
    layers: &'a LayerRegistry,
    adapters: Vec<Arc<LoraAdapter>>,
}

impl Drop for AttachedModules<'_> {
    fn drop(&mut self) {
        for slot in self.layers.slots() {
            for adapter in &self.adapters {
                slot.detach(adapter);
            }
        }
    }
}
