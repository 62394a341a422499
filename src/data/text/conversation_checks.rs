//! The checks of an open conversation dataset that need no tokenizer: empty or missing assistant turns,
//! roles the chat templates do not know, and samples with the same turns as an earlier one. (Lengths need
//! the base model's tokenizer and chat template; the worker adds them.)

use std::collections::HashMap;
use std::sync::Arc;

use super::Sample;
use super::rows::Role;
use crate::messages::{RowFormat, TextBadge};

/// The badges of every sample, in order.
pub fn conversation_badges(samples: &[Arc<Sample>]) -> Vec<Vec<TextBadge>> {
    let mut first_of: HashMap<u64, Vec<usize>> = HashMap::new();
    samples
        .iter()
        .enumerate()
        .map(|(index, sample)| {
            let mut badges = turn_badges(sample);
            let earlier = first_of.entry(sample.fingerprint).or_default();
            match earlier.iter().find(|&&i| samples[i].turns == sample.turns) {
                Some(&of) => badges.push(TextBadge::Duplicate { of }),
                None => earlier.push(index),
            }
            badges
        })
        .collect()
}

fn turn_badges(sample: &Sample) -> Vec<TextBadge> {
    let mut badges = Vec::new();
    if sample.format == RowFormat::Text {
        return badges;
    }
    let roles: Vec<Option<Role>> = sample.turns.iter().map(|t| Role::parse(&t.role)).collect();
    let mut assistant_turns = sample
        .turns
        .iter()
        .zip(&roles)
        .filter(|(_, role)| **role == Some(Role::Assistant))
        .peekable();
    if assistant_turns.peek().is_none() {
        badges.push(TextBadge::NoAssistantTurn);
    } else if assistant_turns.any(|(turn, _)| turn.content.trim().is_empty()) {
        badges.push(TextBadge::EmptyAssistantTurn);
    }
    for (turn, role) in sample.turns.iter().zip(&roles) {
        let badge = TextBadge::UnknownRole(turn.role.clone());
        if role.is_none() && !badges.contains(&badge) {
            badges.push(badge);
        }
    }
    badges
}
