//! Memorization audit by canary exposure (Carlini et al., "The Secret Sharer", 2019).
//!
//! Training with canaries plants random secrets of a fixed format ("The PIN of card 2
//! is 481937.") among the examples, a few copies each. The audit ranks each planted
//! secret's log-likelihood among candidates of the same format — every possible secret
//! when there are few enough, else a seeded random sample — under the base model and
//! under the adapter. A secret ranked r among N candidates has exposure
//! log2 N − log2 r bits: about 1 bit for a secret the model never saw (its rank is
//! uniform), log2 N when it is the most likely of all.
//!
//! Scoring uses the inference engine. The candidates of one canary share the prompt and
//! differ only in the secret's tokens, so they are scored as a prefix tree: one
//! next-token distribution per tree node (the key/value cache holds the path to it)
//! scores every child at once.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::train::rng::Rng;
use crate::engine::{ChatMessage, ChatModel, EngineError, Role};

/// The question each canary is planted with; `{card}` names the canary.
const QUESTION: &str = "What is the PIN of card {card}?";
/// The answer; `{secret}` is the random part.
const ANSWER: &str = "The PIN of card {card} is {secret}.";
const STREAM_SECRETS: u64 = 11;
const STREAM_CANDIDATES: u64 = 12;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub card: String,
    pub secret: String,
}

/// The canaries planted in a training run, recorded in its `training.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canaries {
    /// The user's question, `{card}` standing for the canary's card.
    pub question: String,
    /// The answer learned, `{secret}` standing for `digits` random decimal digits.
    pub answer: String,
    pub digits: usize,
    /// Copies of each canary among the training examples.
    pub repeats: usize,
    pub items: Vec<Canary>,
}

impl Canaries {
    /// `count` canaries with secrets of `digits` digits drawn from `seed`.
    pub fn generate(count: usize, digits: usize, repeats: usize, seed: u64) -> Self {
        let mut rng = Rng::derive(seed, STREAM_SECRETS, 0);
        let mut seen = BTreeSet::new();
        let mut items = Vec::with_capacity(count);
        let space = 10f64.powi(digits as i32);
        while items.len() < count {
            let secret: String = (0..digits).map(|_| char::from(b'0' + rng.below(10) as u8)).collect();
            // Distinct secrets while the space allows.
            if seen.insert(secret.clone()) || seen.len() as f64 >= space {
                items.push(Canary { card: (items.len() + 1).to_string(), secret });
            }
        }
        Self { question: QUESTION.into(), answer: ANSWER.into(), digits, repeats, items }
    }

    /// The conversation that plants `secret` for `card`.
    pub fn messages(&self, card: &str, secret: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::User, self.question.replace("{card}", card)),
            ChatMessage::new(Role::Assistant, self.answer.replace("{card}", card).replace("{secret}", secret)),
        ]
    }

    /// Every canary `repeats` times, as training conversations.
    pub fn conversations(&self) -> Vec<Vec<ChatMessage>> {
        self.items.iter().flat_map(|c| std::iter::repeat_n(self.messages(&c.card, &c.secret), self.repeats)).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Exposure {
    pub rank: usize,
    pub exposure: f64,
    /// Log-likelihood of the secret's tokens (natural log).
    pub log_likelihood: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CanaryReport {
    pub card: String,
    pub secret: String,
    /// Candidates ranked, the canary included.
    pub candidates: usize,
    pub base: Exposure,
    pub adapter: Exposure,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub adapter: String,
    /// True when every possible secret was ranked (else a random sample).
    pub exhaustive: bool,
    pub canaries: Vec<CanaryReport>,
    pub mean_base_exposure: f64,
    pub mean_adapter_exposure: f64,
    pub seconds: f64,
}

/// Ranks each canary among up to `max_candidates` candidates under the base model and
/// under adapter `adapter` (attached to `chat` under that name).
pub fn audit(
    chat: &mut ChatModel,
    adapter: &str,
    canaries: &Canaries,
    max_candidates: usize,
    seed: u64,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<AuditReport, EngineError> {
    let started = std::time::Instant::now();
    chat.slot_of(adapter)?;
    let space = 10u128.checked_pow(canaries.digits as u32).unwrap_or(u128::MAX);
    let exhaustive = space <= max_candidates.max(2) as u128;
    let mut reports = Vec::with_capacity(canaries.items.len());
    for (index, canary) in canaries.items.iter().enumerate() {
        on_progress(index, canaries.items.len());
        let secrets = candidates(canaries.digits, &canary.secret, exhaustive, max_candidates, seed, index);
        let sequences = secrets
            .iter()
            .map(|s| chat.example_tokens(&canaries.messages(&canary.card, s)).map(|(p, c)| [p, c].concat()))
            .collect::<Result<Vec<_>, _>>()?;
        let base = score(chat, &sequences, &[])?;
        let with_adapter = score(chat, &sequences, &[(adapter.to_string(), 1.0)])?;
        // The canary is candidate 0.
        let exposure = |scores: &[f64]| {
            let rank = 1 + scores[1..].iter().filter(|&&s| s > scores[0]).count();
            Exposure { rank, exposure: (secrets.len() as f64).log2() - (rank as f64).log2(), log_likelihood: scores[0] }
        };
        reports.push(CanaryReport {
            card: canary.card.clone(),
            secret: canary.secret.clone(),
            candidates: secrets.len(),
            base: exposure(&base),
            adapter: exposure(&with_adapter),
        });
    }
    on_progress(canaries.items.len(), canaries.items.len());
    let mean = |f: &dyn Fn(&CanaryReport) -> f64| reports.iter().map(f).sum::<f64>() / reports.len().max(1) as f64;
    Ok(AuditReport {
        adapter: adapter.to_string(),
        exhaustive,
        mean_base_exposure: mean(&|r| r.base.exposure),
        mean_adapter_exposure: mean(&|r| r.adapter.exposure),
        canaries: reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The canary's secret first, then every other secret of the format (exhaustive) or
/// `max - 1` distinct random ones.
fn candidates(digits: usize, secret: &str, exhaustive: bool, max: usize, seed: u64, canary: usize) -> Vec<String> {
    let mut out = vec![secret.to_string()];
    if exhaustive {
        let space = 10usize.pow(digits as u32);
        out.extend((0..space).map(|n| format!("{n:0digits$}")).filter(|s| s != secret));
        return out;
    }
    let mut rng = Rng::derive(seed, STREAM_CANDIDATES, canary as u64);
    let mut seen: BTreeSet<String> = out.iter().cloned().collect();
    while out.len() < max.max(2) {
        let s: String = (0..digits).map(|_| char::from(b'0' + rng.below(10) as u8)).collect();
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    out
}

/// Log-likelihood of the part of each sequence where the sequences differ (their
/// common prefix and suffix are left out: the same for every candidate, or not the
/// secret), walking the prefix tree of the sequences in sorted order.
fn score(chat: &mut ChatModel, sequences: &[Vec<u32>], adapters: &[(String, f32)]) -> Result<Vec<f64>, EngineError> {
    let first = &sequences[0];
    let prefix = sequences.iter().map(|s| common_prefix(first, s)).min().unwrap_or(0);
    let suffix = sequences.iter().map(|s| common_suffix(first, s).min(s.len() - prefix)).min().unwrap_or(0);
    let spans: Vec<&[u32]> = sequences.iter().map(|s| &s[prefix..s.len() - suffix]).collect();
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by(|&a, &b| spans[a].cmp(spans[b]));
    let mut scores = vec![0f64; spans.len()];
    // stack[k]: log-probabilities of the next token after the prefix and span[..k].
    let mut stack: Vec<Vec<f32>> = Vec::new();
    let mut previous: &[u32] = &[];
    let mut tokens: Vec<u32> = first[..prefix].to_vec();
    for &i in &order {
        let span = spans[i];
        stack.truncate(common_prefix(previous, span) + 1);
        while stack.len() < span.len() {
            tokens.truncate(prefix);
            tokens.extend_from_slice(&span[..stack.len()]);
            let logits = chat.next_token_logits(&tokens, adapters)?.to_vec1::<f32>()?;
            stack.push(log_softmax(&logits));
        }
        scores[i] = span.iter().enumerate().map(|(k, &t)| f64::from(stack[k][t as usize])).sum();
        previous = span;
    }
    Ok(scores)
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn common_suffix(a: &[u32], b: &[u32]) -> usize {
    a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canaries_are_seeded_distinct_and_planted_repeatedly() {
        let c = Canaries::generate(5, 6, 3, 7);
        assert_eq!(c, Canaries::generate(5, 6, 3, 7));
        assert_ne!(c.items, Canaries::generate(5, 6, 3, 8).items);
        let secrets: BTreeSet<&str> = c.items.iter().map(|i| i.secret.as_str()).collect();
        assert_eq!(secrets.len(), 5);
        assert!(c.items.iter().all(|i| i.secret.len() == 6 && i.secret.bytes().all(|b| b.is_ascii_digit())));
        let conversations = c.conversations();
        assert_eq!(conversations.len(), 15);
        assert_eq!(conversations[0][1].content, format!("The PIN of card 1 is {}.", c.items[0].secret));
        assert_eq!(conversations[0][0].content, "What is the PIN of card 1?");
    }

    #[test]
    fn candidates_hold_the_canary_once_and_are_all_or_sampled() {
        let all = candidates(3, "042", true, 10_000, 1, 0);
        assert_eq!(all.len(), 1000);
        assert_eq!(all[0], "042");
        assert_eq!(all.iter().filter(|s| *s == "042").count(), 1);
        let some = candidates(6, "123456", false, 500, 1, 0);
        assert_eq!(some.len(), 500);
        assert_eq!(some.iter().collect::<BTreeSet<_>>().len(), 500);
        assert_eq!(some, candidates(6, "123456", false, 500, 1, 0));
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
