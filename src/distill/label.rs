//! Update decisions without a teacher: a new fact against the old memories the pipeline
//! retrieved for it, judged by word overlap (LoCoMo's own token F1: normalized, stemmed)
//! and sentence-embedding cosine. Only memories about the fact's person count (the
//! subject a memory was stored with; either side without one counts too).
//!
//! - **NONE** when such a memory already says it: token F1 ≥ [`DUPLICATE_F1`], or cosine
//!   ≥ [`DUPLICATE_COSINE`] with token F1 ≥ [`DUPLICATE_COSINE_F1`].
//! - **DELETE** of the closest memory on the same topic (cosine ≥ [`SAME_TOPIC_COSINE`],
//!   token F1 ≥ [`SAME_TOPIC_F1`]) when the fact says it is over ("no longer", "stopped",
//!   …; [`ENDED_CUES`]) and that memory does not. Rare by design: annotated observations
//!   seldom retract anything.
//! - **UPDATE** of the closest memory on the same topic whose words the fact mostly keeps
//!   (at least [`UPDATE_KEEPS`] of them, what the pipeline asks of any UPDATE): the fact
//!   restates it with something added or changed, so it replaces it without losing what
//!   it said.
//! - **ADD** otherwise: a fact that would drop what a memory says is kept beside it.

use crate::eval::metrics::{f1_score, stemmed_tokens};
use crate::memory::pipeline::UPDATE_KEEPS;

/// Token F1 from which a memory says the same as the fact.
pub const DUPLICATE_F1: f64 = 0.8;
/// Cosine from which a memory means the same as the fact, given some word overlap …
pub const DUPLICATE_COSINE: f32 = 0.92;
/// … at least this token F1 (the embedding alone confuses "likes X" with "dislikes X").
pub const DUPLICATE_COSINE_F1: f64 = 0.5;
/// Cosine from which a memory about the same person is about the same topic …
pub const SAME_TOPIC_COSINE: f32 = 0.65;
/// … when they also share this much wording.
pub const SAME_TOPIC_F1: f64 = 0.35;
/// Words that say something has ended, which makes a same-topic memory a DELETE.
pub const ENDED_CUES: [&str; 7] = ["no longer", "not anymore", "any more", "anymore", "stopped", "quit", "gave up"];

/// An old memory shown to the update operation, with what the labeller compares.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a> {
    pub text: &'a str,
    /// Who the memory is about, when known.
    pub subject: Option<&'a str>,
    /// Cosine of its embedding with the fact's.
    pub cosine: f32,
}

/// A decision about one fact; indices are positions among the memories shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Add,
    None(usize),
    Update(usize),
    Delete(usize),
}

/// A shown memory about the fact's person, as the rules compare it.
struct Related {
    index: usize,
    cosine: f32,
    f1: f64,
    /// Share of the memory's words the fact keeps.
    coverage: f64,
}

impl Related {
    fn same_topic(&self) -> bool {
        self.cosine >= SAME_TOPIC_COSINE && self.f1 >= SAME_TOPIC_F1
    }
}

/// Labels `fact` (about `subject`, when known) against `shown`.
pub fn label(fact: &str, subject: Option<&str>, shown: &[Shown<'_>]) -> Label {
    let fact_words = stemmed_tokens(fact).len();
    let same_person = |memory: &Shown<'_>| match (subject, memory.subject) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => true,
    };
    let related: Vec<Related> = shown
        .iter()
        .enumerate()
        .filter(|(_, memory)| same_person(memory))
        .map(|(index, memory)| {
            let f1 = f1_score(fact, memory.text);
            let memory_words = stemmed_tokens(memory.text).len();
            // F1 = 2·common / (|fact| + |memory|).
            let common = f1 * (fact_words + memory_words) as f64 / 2.0;
            let coverage = if memory_words == 0 { 0.0 } else { common / memory_words as f64 };
            Related { index, cosine: memory.cosine, f1, coverage }
        })
        .collect();
    let duplicate = related
        .iter()
        .filter(|m| m.f1 >= DUPLICATE_F1 || (m.cosine >= DUPLICATE_COSINE && m.f1 >= DUPLICATE_COSINE_F1))
        .max_by(|a, b| a.f1.total_cmp(&b.f1));
    if let Some(memory) = duplicate {
        return Label::None(memory.index);
    }
    let closest = |keep: &dyn Fn(&Related) -> bool| {
        related.iter().filter(|m| m.same_topic() && keep(m)).max_by(|a, b| a.cosine.total_cmp(&b.cosine)).map(|m| m.index)
    };
    if says_ended(fact) {
        if let Some(index) = closest(&|m| !says_ended(shown[m.index].text)) {
            return Label::Delete(index);
        }
    }
    match closest(&|m| m.coverage >= UPDATE_KEEPS) {
        Some(index) => Label::Update(index),
        None => Label::Add,
    }
}

fn says_ended(text: &str) -> bool {
    let lower = text.to_lowercase();
    ENDED_CUES.iter().any(|cue| lower.contains(cue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown<'a>(text: &'a str, subject: &'a str, cosine: f32) -> Shown<'a> {
        Shown { text, subject: Some(subject), cosine }
    }

    #[test]
    fn an_exact_or_near_repeat_is_none() {
        let memories = [shown("Nate plays tennis.", "Nate", 0.4), shown("Nate has a dog named Max.", "Nate", 0.99)];
        assert_eq!(label("Nate has a dog named Max.", Some("Nate"), &memories), Label::None(1));
        assert_eq!(label("nate has a dog named max!", Some("Nate"), &memories), Label::None(1));
        // Same meaning in other words: the embedding with some overlap decides.
        let memories = [shown("Nate owns a dog called Max.", "Nate", 0.95)];
        assert_eq!(label("Nate has a dog named Max.", Some("Nate"), &memories), Label::None(0));
    }

    #[test]
    fn a_change_on_the_same_topic_updates_the_closest_memory_of_that_person() {
        let memories = [
            shown("Joanna lives in Boston.", "Joanna", 0.7),
            shown("Nate has a dog named Max.", "Nate", 0.8),
            shown("Nate has a turtle.", "Nate", 0.7),
        ];
        assert_eq!(label("Nate adopted a second dog named Rex.", Some("Nate"), &memories), Label::Update(1));
        // The same words about another person are not that person's memory.
        let memories = [shown("Joanna has a dog named Max.", "Joanna", 0.85)];
        assert_eq!(label("Nate has a dog named Rex.", Some("Nate"), &memories), Label::Add);
        let memories = [shown("Joanna has a dog named Max.", "Joanna", 0.99)];
        assert_eq!(label("Nate has a dog named Max.", Some("Nate"), &memories), Label::Add);
    }

    #[test]
    fn novel_facts_are_added_and_endings_delete() {
        let memories = [shown("Nate has a dog named Max.", "Nate", 0.2)];
        assert_eq!(label("Nate won a video game tournament.", Some("Nate"), &memories), Label::Add);
        assert_eq!(label("Nate won a video game tournament.", Some("Nate"), &[]), Label::Add);
        // Same topic, but replacing the memory would lose what it says: kept beside it.
        let memories = [shown("Tim's favorite book is Harry Potter because it is immersive.", "Tim", 0.8)];
        assert_eq!(label("Tim's favorite film is Star Wars as it never gets old.", Some("Tim"), &memories), Label::Add);
        let memories = [shown("Nate plays tennis every week.", "Nate", 0.8)];
        assert_eq!(label("Nate no longer plays tennis.", Some("Nate"), &memories), Label::Delete(0));
        // A memory that already says it ended is not deleted by a second ending.
        let memories = [shown("Nate stopped playing tennis in May.", "Nate", 0.8)];
        assert_eq!(label("Nate stopped playing tennis last year.", Some("Nate"), &memories), Label::Update(0));
    }
}
