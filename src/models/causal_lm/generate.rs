//! Text generation with a key/value cache: the prompts of a batch are left-padded and read in one pass,
//! then each step feeds every row's last token and picks the next one, greedily (transformers'
//! `do_sample=False`) or by sampling with a temperature, top-k and top-p, after transformers' repetition
//! penalty, until each row has produced a stop token or the token budget is spent.

use candle_core::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batch::{PaddingSide, TEXT_SEGMENT, TokenBatch};
use super::model::CausalLm;
use crate::models::decoding::argmax;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token; above 0 divides the logits before sampling.
    pub temperature: f64,
    /// Sampling keeps the most likely tokens whose probabilities add up to this (1 keeps all).
    pub top_p: f64,
    /// Sampling keeps at most this many of the most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Above 1, the logits of tokens already in the row (prompt or reply) are made less likely: divided by it
    /// when positive, multiplied when negative (transformers' `repetition_penalty`; greedy decoding too).
    pub repetition_penalty: f64,
}

impl Sampling {
    /// Always the most likely token.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
    };
}

/// What a generation produces and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// A row ends with the first of these it produces (kept in its output).
    pub stop_ids: Vec<u32>,
    pub sampling: Sampling,
    /// Seeds the sampler (unused when greedy).
    pub seed: u64,
}

/// Continues each of `prompts` and returns the new tokens of each (ending with a stop token if one came
/// before the budget ran out). `on_token(row, token)` sees every new token as it is chosen.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    generate_while(model, prompts, settings, |row, token| {
        on_token(row, token);
        true
    })
}

/// [`generate`], stopping early (with the tokens so far) as soon as `on_token` returns false: a reply that
/// is no longer wanted ends between two tokens.
pub fn generate_while(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("every prompt needs at least one token");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let mut cache = model.new_cache();
    let mut batch = TokenBatch::padded(prompts, 0, PaddingSide::Left)?;
    let mut outputs = vec![Vec::new(); prompts.len()];
    let mut finished = vec![false; prompts.len()];
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..settings.max_new_tokens {
        let logits = model
            .last_logits(&batch, Some(&mut cache))?
            .to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (row, scores) in logits.into_iter().enumerate() {
            let scores = penalize_repeats(scores, &seen[row], settings.sampling.repetition_penalty);
            let token = sample(&scores, settings.sampling, &mut rng);
            seen[row].push(token);
            if !finished[row] {
                outputs[row].push(token);
                if !on_token(row, token) {
                    return Ok(outputs);
                }
                finished[row] = settings.stop_ids.contains(&token);
            }
            next.push(vec![token]);
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        let segments = vec![vec![TEXT_SEGMENT]; prompts.len()];
        batch = cache.next_batch(next, segments)?;
    }
    Ok(outputs)
}

/// `logits` with transformers' repetition penalty applied to every token of `seen`.
fn penalize_repeats(mut logits: Vec<f32>, seen: &[u32], penalty: f64) -> Vec<f32> {
    if penalty == 1.0 {
        return logits;
    }
    let penalty = penalty as f32;
    let mut penalized = vec![false; logits.len()];
    for &token in seen {
        let Some(logit) = logits.get_mut(token as usize) else {
            continue;
        };
        if !std::mem::replace(&mut penalized[token as usize], true) {
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        }
    }
    logits
}

/// The next token for `logits` (one row): the most likely one, or one drawn from the temperature-scaled
/// distribution cut to its top-k tokens and then to its top-p nucleus (transformers' order: temperature,
/// top-k, top-p).
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits);
    }
    let scale = 1.0 / sampling.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) * scale).exp()))
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if sampling.top_k > 0 {
        candidates.truncate(sampling.top_k);
    }
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    // Keep each token whose more likely predecessors hold less than top-p of the mass.
    let mut before = 0.0;
    let kept = candidates
        .iter()
        .take_while(|c| {
            let keep = before < sampling.top_p * total;
            before += c.1;
            keep
        })
        .count()
        .max(1);
    candidates.truncate(kept);
    let mass: f64 = candidates.iter().map(|c| c.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for &(token, weight) in &candidates {
        if draw < weight {
            return token;
        }
        draw -= weight;
    }
    candidates[kept - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0, 2.9], Sampling::GREEDY, &mut rng),
            1
        );
    }

    #[test]
    fn sampling_follows_the_tempered_distribution_within_the_nucleus() {
        let logits = [0f32, 1.0, 2.0, -10.0];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws = 20_000;
        let mut counts = [0usize; 4];
        let plain = Sampling {
            temperature: 1.0,
            ..Sampling::GREEDY
        };
        for _ in 0..draws {
            counts[sample(&logits, plain, &mut rng) as usize] += 1;
        }
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (count, weight) in counts.iter().zip(&weights) {
            let expected = weight / total;
            assert!(
                (*count as f64 / draws as f64 - expected).abs() < 0.015,
                "{counts:?}"
            );
        }
        // p(2) ≈ 0.665, p(1) ≈ 0.245: a nucleus of 0.7 keeps tokens 2 and 1 only.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.7,
            ..Sampling::GREEDY
        };
        let seen: std::collections::BTreeSet<u32> = (0..2_000)
            .map(|_| sample(&logits, nucleus, &mut rng))
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [1, 2]);
        // A tiny nucleus is greedy.
        let tiny = Sampling {
            temperature: 1.0,
            top_p: 1e-6,
            ..Sampling::GREEDY
        };
        assert!((0..100).all(|_| sample(&logits, tiny, &mut rng) == 2));
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_and_top_p_applies_within_them() {
        let logits = [0f32, 1.0, 2.0, 1.5];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let seen = |sampling: Sampling, rng: &mut ChaCha8Rng| {
            (0..2_000)
                .map(|_| sample(&logits, sampling, rng))
                .collect::<std::collections::BTreeSet<u32>>()
                .into_iter()
                .collect::<Vec<_>>()
        };
        let top_two = Sampling {
            temperature: 1.0,
            top_k: 2,
            ..Sampling::GREEDY
        };
        assert_eq!(seen(top_two, &mut rng), [2, 3]);
        // Within the top two, p(2) = 1/(1 + e^-0.5) ≈ 0.62: a nucleus of 0.6 keeps token 2 alone, though
        // over all four tokens it would keep two.
        let both = Sampling {
            top_p: 0.6,
            ..top_two
        };
        assert_eq!(seen(both, &mut rng), [2]);
    }

    #[test]
    fn the_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token() {
        let logits = vec![2.0f32, -1.0, 3.0, 0.5];
        let penalized = penalize_repeats(logits.clone(), &[0, 1, 0], 2.0);
        assert_eq!(penalized, [1.0, -2.0, 3.0, 0.5]);
        assert_eq!(penalize_repeats(logits.clone(), &[0, 1], 1.0), logits);
        // Greedy decoding turns away from a repeated token.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let repeated = penalize_repeats(vec![3.0, 2.0], &[0], 2.0);
        assert_eq!(sample(&repeated, Sampling::GREEDY, &mut rng), 1);
    }
}
