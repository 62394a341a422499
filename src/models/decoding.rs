//! Choosing a generated text's tokens one at a time, as transformers' `generate` does: greedy decoding, or
//! beam search with its defaults (length penalty 1, `early_stopping=False`), with a minimum length and a
//! repetition penalty. Model-agnostic: the model is a function from the sequences so far to the logits of
//! each one's next token.

use std::cmp::Ordering;

use candle_core::Result;

/// transformers' stand-in for "impossible" in beam scores.
const IMPOSSIBLE: f32 = -1.0e9;

/// How a text is decoded. Lengths count the tokens after the prompt, the end token included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoding {
    /// The end token is not chosen before this many tokens.
    pub min_tokens: usize,
    pub max_tokens: usize,
    /// 1 decodes greedily; more searches this many sequences at once and keeps the most likely.
    pub beams: usize,
    /// Above 1 makes tokens already in the text less likely (transformers' `repetition_penalty`).
    pub repetition_penalty: f32,
}

/// Decodes after `prompt` until `end` or `decoding.max_tokens`. `next_logits` gets sequences of equal
/// length and returns, for each, the logits of the token that follows it. The result starts with the
/// prompt and ends with `end` when the text ended before the length limit.
pub fn decode(
    prompt: &[u32],
    end: u32,
    decoding: &Decoding,
    mut next_logits: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<u32>> {
    if decoding.beams <= 1 {
        greedy(prompt, end, decoding, &mut next_logits)
    } else {
        beam_search(prompt, end, decoding, &mut next_logits)
    }
}

/// The most likely token at every step.
fn greedy(
    prompt: &[u32],
    end: u32,
    decoding: &Decoding,
    next_logits: &mut impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<u32>> {
    let mut ids = vec![prompt.to_vec()];
    for step in 0..decoding.max_tokens {
        let mut scores = only_row(next_logits(&ids)?)?;
        penalise_repeats(&mut scores, &ids[0], decoding.repetition_penalty);
        if step < decoding.min_tokens {
            forbid(&mut scores, end);
        }
        let next = argmax(&scores);
        ids[0].push(next);
        if next == end {
            break;
        }
    }
    Ok(ids.swap_remove(0))
}

/// One sequence of a beam search with its summed log-probability.
#[derive(Debug, Clone)]
struct Hypothesis {
    ids: Vec<u32>,
    score: f32,
}

/// A continuation of one running hypothesis by one token.
#[derive(Debug, Clone, Copy)]
struct Continuation {
    beam: usize,
    token: u32,
    score: f32,
    /// It ends here: the end token, or the length limit.
    ends: bool,
}

/// Beam search: each step extends every running hypothesis by every token, keeps the `2 * beams` best
/// continuations, moves those that end (among the first `beams`) into the finished set scored by their
/// mean log-probability, and runs on with the `beams` best that do not end. It stops when no running
/// hypothesis can beat the worst finished one, or when every continuation ends.
fn beam_search(
    prompt: &[u32],
    end: u32,
    decoding: &Decoding,
    next_logits: &mut impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<u32>> {
    let beams = decoding.beams;
    let keep = 2 * beams;
    let hypothesis = |score| Hypothesis {
        ids: prompt.to_vec(),
        score,
    };
    // All beams start as the prompt; only the first is live, so the first step does not pick one token
    // `beams` times.
    let mut running: Vec<Hypothesis> = (0..beams)
        .map(|b| hypothesis(if b == 0 { 0.0 } else { IMPOSSIBLE }))
        .collect();
    let mut finished: Vec<(Hypothesis, bool)> = (0..beams)
        .map(|_| (hypothesis(IMPOSSIBLE), false))
        .collect();
    for step in 0..decoding.max_tokens {
        let sequences: Vec<Vec<u32>> = running.iter().map(|h| h.ids.clone()).collect();
        let logits = next_logits(&sequences)?;
        let last_step = step + 1 == decoding.max_tokens;
        let mut candidates = Vec::with_capacity(beams * logits.first().map_or(0, Vec::len));
        for (beam, (hypothesis, mut scores)) in running.iter().zip(logits).enumerate() {
            log_softmax(&mut scores);
            penalise_repeats(&mut scores, &hypothesis.ids, decoding.repetition_penalty);
            if step < decoding.min_tokens {
                forbid(&mut scores, end);
            }
            candidates.extend(scores.iter().enumerate().map(|(token, &s)| Continuation {
                beam,
                token: token as u32,
                score: s + hypothesis.score,
                ends: token as u32 == end || last_step,
            }));
        }
        let best = best_first(candidates, keep, |c| c.score);
        let extend = |c: &Continuation| {
            let mut ids = running[c.beam].ids.clone();
            ids.push(c.token);
            ids
        };
        // Ended continuations cannot run on: they sink to the bottom by the same margin transformers uses.
        let next_running: Vec<Hypothesis> = best_first(best.clone(), beams, |c| {
            c.score + if c.ends { IMPOSSIBLE } else { 0.0 }
        })
        .iter()
        .map(|c| Hypothesis {
            ids: extend(c),
            score: c.score + if c.ends { IMPOSSIBLE } else { 0.0 },
        })
        .collect();
        let generated = (step + 1) as f32;
        let mut pool = std::mem::take(&mut finished);
        pool.extend(best.iter().enumerate().map(|(rank, c)| {
            let qualifies = c.ends && rank < beams;
            let score = c.score / generated + if qualifies { 0.0 } else { IMPOSSIBLE };
            (
                Hypothesis {
                    ids: extend(c),
                    score,
                },
                qualifies,
            )
        }));
        finished = best_first(pool, beams, |(h, _)| h.score);
        running = next_running;
        if best.iter().all(|c| c.ends) || !can_improve(&running, &finished, generated) {
            break;
        }
    }
    Ok(finished.swap_remove(0).0.ids)
}

/// Whether the best running hypothesis, at its length now, still beats the worst finished one; always
/// true while fewer than `beams` hypotheses have finished.
fn can_improve(running: &[Hypothesis], finished: &[(Hypothesis, bool)], generated: f32) -> bool {
    let best_possible = running[0].score / generated;
    let worst_finished = finished
        .iter()
        .map(|(h, _)| h.score)
        .fold(f32::INFINITY, f32::min);
    finished.iter().any(|&(_, done)| {
        let bar = if done { worst_finished } else { IMPOSSIBLE };
        best_possible > bar
    })
}

/// The `count` items with the highest `key`, highest first; equal keys keep their order.
fn best_first<T>(mut items: Vec<T>, count: usize, key: impl Fn(&T) -> f32) -> Vec<T> {
    let by_key = |a: &T, b: &T| key(b).total_cmp(&key(a));
    if items.len() > count && count > 0 {
        // Cut to the `count` best first: a full stable sort of every token of every beam is wasteful.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.select_nth_unstable_by(count - 1, |&a, &b| {
            by_key(&items[a], &items[b]).then(a.cmp(&b))
        });
        order.truncate(count);
        order.sort_unstable();
        let mut kept: Vec<Option<T>> = items.into_iter().map(Some).collect();
        items = order.into_iter().filter_map(|i| kept[i].take()).collect();
    }
    items.sort_by(by_key);
    items.truncate(count);
    items
}

/// The single row of a one-sequence call.
fn only_row(mut rows: Vec<Vec<f32>>) -> Result<Vec<f32>> {
    match rows.len() {
        1 => Ok(rows.swap_remove(0)),
        n => candle_core::bail!("the model returned {n} rows of logits for one sequence"),
    }
}

/// transformers' repetition penalty: scores of tokens already in `ids` are divided by `penalty` when
/// positive and multiplied by it when negative.
fn penalise_repeats(scores: &mut [f32], ids: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in ids {
        let id = id as usize;
        if id < scores.len() && !std::mem::replace(&mut seen[id], true) {
            let s = scores[id];
            scores[id] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

fn forbid(scores: &mut [f32], token: u32) {
    if let Some(s) = scores.get_mut(token as usize) {
        *s = f32::NEG_INFINITY;
    }
}

/// In place: `x - max - ln(sum(exp(x - max)))`.
fn log_softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = values.iter().map(|&v| (v - max).exp()).sum();
    let shift = max + sum.ln();
    for v in values {
        *v -= shift;
    }
}

/// The index of the largest value (the first on ties, as `torch.argmax`).
pub(crate) fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v.partial_cmp(&values[best]) == Some(Ordering::Greater) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model over a 4-token vocabulary (token 3 ends) whose logits depend only on the last token.
    fn table(ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(ids
            .iter()
            .map(|seq| match seq.last() {
                Some(0) => vec![0.0, 2.0, 1.9, -1.0],
                Some(1) => vec![0.0, -3.0, -3.0, 0.5],
                Some(2) => vec![-2.0, -2.0, -2.0, 3.0],
                _ => vec![0.0, 0.0, 0.0, 0.0],
            })
            .collect())
    }

    fn decoding(beams: usize) -> Decoding {
        Decoding {
            min_tokens: 0,
            max_tokens: 6,
            beams,
            repetition_penalty: 1.0,
        }
    }

    #[test]
    fn greedy_takes_the_likeliest_token_and_beams_find_the_likelier_text() {
        // Greedy: 0 -> 1 (2.0) -> end (0.5), a text whose probability is lower than 0 -> 2 -> end.
        assert_eq!(decode(&[0], 3, &decoding(1), table).unwrap(), [0, 1, 3]);
        assert_eq!(decode(&[0], 3, &decoding(2), table).unwrap(), [0, 2, 3]);
    }

    #[test]
    fn the_minimum_length_holds_the_end_token_back() {
        let d = Decoding {
            min_tokens: 3,
            ..decoding(1)
        };
        let ids = decode(&[0], 3, &d, table).unwrap();
        assert_eq!(ids.len(), 4 + 1, "{ids:?}");
        assert_eq!(*ids.last().unwrap(), 3);
    }

    #[test]
    fn the_length_limit_ends_a_text_without_its_end_token() {
        let never_ends =
            |ids: &[Vec<u32>]| Ok(ids.iter().map(|_| vec![1.0, 0.0, 0.0, -9.0]).collect());
        for beams in [1, 3] {
            let ids = decode(&[2], 3, &decoding(beams), never_ends).unwrap();
            assert_eq!(ids, [2, 0, 0, 0, 0, 0, 0], "{beams} beams");
        }
    }

    #[test]
    fn the_repetition_penalty_scales_scores_of_tokens_already_used() {
        let mut scores = vec![2.0, -2.0, 1.0, -1.0];
        penalise_repeats(&mut scores, &[0, 1, 1], 2.0);
        assert_eq!(scores, [1.0, -4.0, 1.0, -1.0]);
        // Greedy would repeat token 0 forever; the penalty moves it on.
        let sticky = |ids: &[Vec<u32>]| Ok(ids.iter().map(|_| vec![1.0, 0.9, 0.0, -9.0]).collect());
        let d = Decoding {
            max_tokens: 2,
            repetition_penalty: 1.5,
            ..decoding(1)
        };
        assert_eq!(decode(&[2], 3, &d, sticky).unwrap(), [2, 0, 1]);
    }

    #[test]
    fn the_best_items_come_first_and_ties_keep_their_order() {
        let items = vec![(0, 1.0), (1, 3.0), (2, 1.0), (3, 2.0), (4, 3.0)];
        let best = best_first(items.clone(), 3, |&(_, k)| k);
        assert_eq!(best, [(1, 3.0), (4, 3.0), (3, 2.0)]);
        let all = best_first(items, 9, |&(_, k)| k);
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 4, 3, 0, 2]);
    }
}
