//! What may become a memory: only what the turns state, never what a model made up.
//!
//! **Statements.** A turn's sentences are split at `.`, `!`, `?` and line breaks. A
//! sentence is *not* a statement when it is a question (it ends in `?`, or opens with a
//! question word followed by a verb, "what is", "do you", "how did"), small talk (every
//! word is a greeting, thanks, reaction or filler: "Thanks, that's great!", "ok",
//! "haha"), or a request to the assistant (it opens with "tell me", "can you", "write",
//! "translate", …; "please remember that …" is a statement of what follows). An exchange
//! without statements is not given to the extraction operation at all.
//!
//! **Grounded facts.** A fact the model extracted is kept only when the statements of
//! its window support it:
//! 1. every name in it (a capitalised word that is not a pronoun, an article, a month or
//!    a weekday) occurs in the statements or is a speaker;
//! 2. every number in it occurs in the statements, except the day and year of a date
//!    whose year is within a year of the session's (dates the model or
//!    [`super::dates`] wrote out for "yesterday");
//! 3. at least [`CONTENT_SUPPORT`] of its other content words (stemmed as LoCoMo's F1
//!    stems them, stop words left out) occur, stemmed, in the statements — words for the
//!    same event may differ ("went" / "attended"), invented content may not;
//! 4. it has at least one content word or name beyond the speaker's name.
//!
//! The prompt's own example ("Sam adopted a puppy named Rex") fails rule 1 in any window
//! that does not mention Sam and Rex.

use std::collections::HashSet;

use crate::eval::metrics::porter_stem;
use crate::transcript::MONTHS;

/// Share of a fact's content words that the statements must contain.
pub const CONTENT_SUPPORT: f64 = 0.5;

/// The sentences of `text` that state something.
pub fn statements(text: &str) -> Vec<&str> {
    sentences(text).into_iter().filter(|sentence| is_statement(sentence)).collect()
}

/// Whether `sentence` (one sentence, its final punctuation included) states something.
pub fn is_statement(sentence: &str) -> bool {
    let sentence = sentence.trim();
    if sentence.ends_with('?') {
        return false;
    }
    let words = lower_words(sentence);
    let Some(first) = words.first() else { return false };
    if words.iter().all(|w| listed(SMALL_TALK, w.as_str()) || listed(STOP_WORDS, w.as_str())) {
        return false;
    }
    let second = words.get(1).map(String::as_str).unwrap_or("");
    if listed(QUESTION_WORDS, first.as_str()) && listed(QUESTION_VERBS, second) {
        return false;
    }
    if listed(AUXILIARIES, first.as_str()) && listed("you i we it there they he she that this", second) {
        return false;
    }
    // "please remember that my sister lives in Lisbon": what follows is the statement.
    let rest: Vec<&str> = words.iter().map(String::as_str).skip_while(|w| *w == "please").collect();
    if rest.first().is_some_and(|w| listed("remember note noted", w)) {
        return rest.len() > 2;
    }
    !rest.first().is_some_and(|w| listed(REQUESTS, w))
}

/// Why `fact` is not supported by `statements` (the window's statements and its
/// speakers' names), or `None` when it is. `session_year` is the year of the session's
/// date, when known.
pub fn unsupported(fact: &str, statements: &[&str], speakers: &[&str], session_year: Option<i16>) -> Option<String> {
    let support_text = statements.join(" ");
    let support_words: HashSet<String> = lower_words(&support_text).into_iter().collect();
    let support_stems: HashSet<String> = support_words.iter().map(|w| porter_stem(w)).collect();
    let speaker_words: HashSet<String> = speakers.iter().flat_map(|s| lower_words(s)).collect();
    let words = raw_words(fact);
    let mut content = 0usize;
    let mut supported = 0usize;
    let mut beyond_speaker = false;
    for (index, word) in words.iter().enumerate() {
        let lower = word.to_lowercase();
        if word.chars().any(|c| c.is_ascii_digit()) {
            let is_date_part = is_date_number(&words, index, session_year);
            if !is_date_part && !support_words.contains(&lower) {
                return Some(format!("the number {word:?} is not in what was said"));
            }
            beyond_speaker = true;
            continue;
        }
        if is_month(word) || listed(WEEKDAYS, lower.as_str()) {
            continue;
        }
        let capitalised = word.chars().next().is_some_and(char::is_uppercase);
        if capitalised && !listed(STOP_WORDS, lower.as_str()) && !listed(NOT_NAMES, lower.as_str()) {
            if speaker_words.contains(&lower) {
                continue;
            }
            if !support_words.contains(&lower) && !support_stems.contains(&porter_stem(&lower)) {
                return Some(format!("the name {word:?} is not in what was said"));
            }
            beyond_speaker = true;
            continue;
        }
        if listed(STOP_WORDS, lower.as_str()) || speaker_words.contains(&lower) {
            continue;
        }
        content += 1;
        beyond_speaker = true;
        if support_words.contains(&lower) || support_stems.contains(&porter_stem(&lower)) {
            supported += 1;
        }
    }
    if !beyond_speaker {
        return Some("it says nothing beyond a name".into());
    }
    if content > 0 && (supported as f64) < CONTENT_SUPPORT * content as f64 {
        return Some(format!("only {supported} of its {content} content words are in what was said"));
    }
    None
}

/// The speaker of the extraction prompt's example (config/prompts.toml). Small models —
/// the first extraction expert among them — write it for the speaker they were given.
pub const EXAMPLE_SPEAKER: &str = "Sam";

/// `fact` with the example's speaker, as a whole word, replaced by `speaker` — the only
/// speaker of the window — when the statements never name it. The example's other
/// content (a puppy named Rex) stays, and fails the rules above.
pub fn with_speaker_for_example(fact: &str, statements: &[&str], speaker: &str) -> String {
    let said = lower_words(&statements.join(" "));
    if said.iter().any(|w| w == &EXAMPLE_SPEAKER.to_lowercase()) {
        return fact.to_owned();
    }
    let mut out = String::with_capacity(fact.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(if word == EXAMPLE_SPEAKER { speaker } else { word.as_str() });
        word.clear();
    };
    for c in fact.chars() {
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The fact up to its first joint (" and ", ", ", " who ", " but ", …), when that part
/// is a clause of its own (three words or more): a fact whose tail was made up may still
/// begin with what was said.
pub fn leading_clause(fact: &str) -> Option<String> {
    let cut = [" and ", ", ", " who ", " which ", " but ", " while "].iter().filter_map(|joint| fact.find(joint)).min()?;
    let head = fact[..cut].trim();
    (head.split_whitespace().count() >= 3).then(|| format!("{head}."))
}

/// A day (1–31 next to a month name) or a year of a date within a year of the session.
fn is_date_number(words: &[&str], index: usize, session_year: Option<i16>) -> bool {
    let Ok(value) = words[index].parse::<i64>() else { return false };
    let month_at = |i: Option<usize>| i.and_then(|i| words.get(i)).is_some_and(|w| is_month(w));
    let near_year = |year: i64| session_year.is_some_and(|session| (year - i64::from(session)).abs() <= 1);
    if (1000..=9999).contains(&value) {
        return near_year(value);
    }
    (1..=31).contains(&value) && (month_at(index.checked_sub(1)) || month_at(Some(index + 1)))
}

/// Sentences with their final punctuation.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (at, c) in text.char_indices() {
        if matches!(c, '.' | '!' | '?' | '\n') {
            let end = at + c.len_utf8();
            // A full stop inside a number ("3.5") or an abbreviation's run ("...") is not an end.
            let next = text[end..].chars().next();
            if c == '.' && next.is_some_and(|n| n.is_alphanumeric() || n == '.') {
                continue;
            }
            if !text[start..end].trim().is_empty() {
                out.push(text[start..end].trim());
            }
            start = end;
        }
    }
    if !text[start..].trim().is_empty() {
        out.push(text[start..].trim());
    }
    out
}

/// Words, apostrophes inside them kept and a possessive "'s" dropped.
fn raw_words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’'))
        .map(|w| w.trim_matches(['\'', '’']))
        .map(|w| w.strip_suffix("'s").or_else(|| w.strip_suffix("’s")).unwrap_or(w))
        .filter(|w| !w.is_empty())
        .collect()
}

fn lower_words(text: &str) -> Vec<String> {
    raw_words(text).into_iter().map(|w| w.to_lowercase().replace('’', "'")).collect()
}

/// Whether `word` is one of the space-separated words of `list`.
fn listed(list: &str, word: &str) -> bool {
    list.split_ascii_whitespace().any(|listed| listed == word)
}

fn is_month(word: &str) -> bool {
    MONTHS.iter().any(|month| month.eq_ignore_ascii_case(word))
}

// Word lists, space-separated, lower case.

const WEEKDAYS: &str = "monday tuesday wednesday thursday friday saturday sunday";

/// Capitalised words that are not names.
const NOT_NAMES: &str = "user i i'm i've i'd i'll mr mrs ms dr";

const QUESTION_WORDS: &str = "what what's whats where where's when who who's whom whose why how how's which";
const QUESTION_VERBS: &str = concat!(
    "is are was were do does did can could would will should have has had am about much many long old far ",
    "often come else kind time up if ",
);
const AUXILIARIES: &str = "do does did are is was were can could would will should have has am shall may might";
/// Openings of a request to the assistant.
const REQUESTS: &str = concat!(
    "tell show give help explain write translate summarize summarise describe list define calculate ",
    "compute find search suggest recommend draft generate compose say repeat continue convert check ",
    "rewrite rephrase let's lets imagine pretend count name spell play sing ",
);
/// Greetings, thanks, reactions, fillers and talk about the talk.
const SMALL_TALK: &str = concat!(
    "hi hello hey heya hiya yo greetings morning afternoon evening night good great thanks thank thx ty ",
    "cheers ok okay k kk sure yes yeah yep yup no nope nah cool nice awesome amazing wow whoa haha hahaha ",
    "lol lmao rofl hmm hm um uh oh ah bye goodbye later soon care welcome sorry pardon excuse alright ",
    "right fine got gotcha understood perfect lovely wonderful sweet neat fun funny interesting agreed ",
    "indeed exactly true totally absolutely definitely really helpful bad never mind nevermind whatever ",
    "anyway anyways change subject topic please sounds see ya cya brilliant fantastic excellent glad ",
    "appreciate appreciated makes sense noted hah heh omg congrats congratulations bless wish luck hope ",
    "day week weekend again more answer question useful clear ready done go ahead stop enough forget ",
);
/// Words that carry no content of their own.
const STOP_WORDS: &str = concat!(
    "a an the and or but if of to in on at by for with about from into over after before during since ",
    "until up down out off as than then so too very just also that this these those there here it its ",
    "it's is are was were be been being am have has had having do does did done will would can could ",
    "should shall may might must not no i i'm i've i'd i'll me my mine myself you you're your yours we ",
    "our us they their them he his him she her hers who whom which what when where why how all any some ",
    "each every both more most much many own same other such only now that's what's let lot really quite ",
    "pretty well still even yet ever one named called user s t don't didn't doesn't isn't wasn't can't ",
    "won't something thing things get got week month year day weekend ",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_small_talk_and_requests_are_not_statements() {
        for text in [
            "What is my dog's name and where do I work?",
            "Where do I work",
            "Do you know a good recipe",
            "Thanks, that's great!",
            "ok",
            "Haha nice",
            "Tell me a joke.",
            "Can you help me write an email?",
            "Good morning!",
            "Never mind.",
        ] {
            assert!(statements(text).is_empty(), "{text:?} gave {:?}", statements(text));
        }
    }

    #[test]
    fn statements_are_kept_beside_questions() {
        assert_eq!(statements("I moved to Porto in May. What is good there?"), vec!["I moved to Porto in May."]);
        assert_eq!(statements("When I was young I lived in Rome."), vec!["When I was young I lived in Rome."]);
        assert_eq!(statements("Please remember that my sister lives in Lisbon."), vec!["Please remember that my sister lives in Lisbon."]);
        assert_eq!(statements("It costs 3.5 euros. Wow!"), vec!["It costs 3.5 euros."]);
    }

    #[test]
    fn the_prompt_example_is_not_grounded_in_a_question() {
        let said = ["I just adopted a beagle named Biscuit, and I work as a nurse in Leeds."];
        let example = "Sam adopted a puppy named Rex on 7 December 2026.";
        assert!(unsupported(example, &said, &["User"], Some(2026)).unwrap().contains("Sam"));
        assert!(unsupported(example, &[], &["User"], Some(2026)).is_some());
    }

    #[test]
    fn facts_in_other_words_and_with_resolved_dates_are_grounded() {
        let said = ["I went to a LGBTQ support group yesterday and it was so powerful."];
        assert_eq!(
            unsupported("Caroline attended an LGBTQ support group on 7 May 2023.", &said, &["Caroline", "Melanie"], Some(2023)),
            None
        );
        let said = ["I just adopted a beagle named Biscuit, and I work as a nurse in Leeds."];
        assert_eq!(unsupported("User works as a nurse in Leeds.", &said, &["User"], Some(2026)), None);
        assert_eq!(unsupported("User adopted a beagle named Biscuit.", &said, &["User"], Some(2026)), None);
    }

    #[test]
    fn the_examples_speaker_stands_for_the_only_speaker() {
        assert!(crate::memory::prompts::Prompts::builtin()
            .render(crate::memory::pipeline::Operation::Extract, serde_json::json!({"date": null, "turns": []}))
            .unwrap()
            .messages[0]
            .content
            .contains(&format!("{EXAMPLE_SPEAKER}: I adopted")));
        let said = ["I'm allergic to peanuts."];
        assert_eq!(with_speaker_for_example("Sam is allergic to peanuts.", &said, "User"), "User is allergic to peanuts.");
        assert_eq!(with_speaker_for_example("Samantha is here.", &said, "User"), "Samantha is here.");
        let adopted = with_speaker_for_example("Sam adopted a puppy named Rex.", &said, "User");
        assert!(unsupported(&adopted, &said, &["User"], None).unwrap().contains("Rex"));
        assert_eq!(with_speaker_for_example("Sam met Ann.", &["Sam said hi to me."], "User"), "Sam met Ann.");
    }

    #[test]
    fn a_leading_clause_stands_on_its_own() {
        let fact = "Alice works as a nurse in Lisbon and has a sister named Sam.";
        assert_eq!(leading_clause(fact).as_deref(), Some("Alice works as a nurse in Lisbon."));
        assert_eq!(leading_clause("Sam and Rex play."), None);
        assert_eq!(leading_clause("Alice is a nurse."), None);
    }

    #[test]
    fn invented_names_numbers_and_content_are_not() {
        let said = ["My sister moved to Porto."];
        assert!(unsupported("User's sister moved to Lisbon.", &said, &["User"], Some(2026)).unwrap().contains("Lisbon"));
        assert!(unsupported("User's sister is 34 years old.", &said, &["User"], Some(2026)).unwrap().contains("34"));
        assert!(unsupported("User enjoys painting landscapes and hiking mountains.", &said, &["User"], Some(2026))
            .unwrap()
            .contains("content"));
        assert!(unsupported("User moved to Porto in 1999.", &said, &["User"], Some(2026)).unwrap().contains("1999"));
        assert!(unsupported("User.", &said, &["User"], Some(2026)).is_some());
    }
}
