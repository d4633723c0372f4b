//! LoCoMo answer-scoring metrics: a Rust port of the scoring rules of LoCoMo's official
//! evaluation (snap-research/locomo, `task_eval/evaluation.py`, functions `normalize_answer`,
//! `f1_score`, `f1` and `eval_question_answering`; aggregation as in
//! `task_eval/evaluation_stats.py`), plus a BLEU-1 that the official code does not have.
//!
//! Every rule below was checked against the official Python source and, for the numbers,
//! against the Python stack it runs on (nltk 3.10 `PorterStemmer()`, the `regex` module,
//! numpy, nltk `sentence_bleu`): the scratch crate this file was written in
//! (`/work/scratch/metrics`: `tools/oracle.py` + `examples/oracle_check.rs`) compares it with that
//! stack bit for bit on ~57,000 cases (every distinct LoCoMo token's stem, normalization of every
//! LoCoMo text, 23,000 scored prediction/answer pairs).
//!
//! # Rules (what the official code does, and what this file does)
//!
//! **Answer text.** The official code scores `str(answer)`, so a JSON number answer such as
//! `2022` is scored as the text `"2022"`; [`answer_text`] does that conversion.
//!
//! **`normalize_answer`** ([`normalize_answer`]), in this order:
//! 1. delete every `,` (it is deleted, not replaced by a space: `"1,000"` becomes `"1000"`);
//! 2. lowercase (Python `str.lower`; Rust `str::to_lowercase` uses the same full Unicode
//!    mapping, final sigma included; the two can differ only where their Unicode versions do);
//! 3. delete every character of Python's `string.punctuation`, i.e. the 32 ASCII punctuation
//!    characters ``!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~`` (= `char::is_ascii_punctuation`). They are
//!    deleted, not replaced: `"don't"` -> `"dont"`, `"well-known"` -> `"wellknown"`,
//!    `"2023-05-07"` -> `"20230507"`. Non-ASCII punctuation (`’`, `—`, `…`) is kept;
//! 4. replace each whole word `a`, `an`, `the` and also `and` by a space (LoCoMo added `and`
//!    to the usual SQuAD list). "Whole word" is the `regex` module's `\b`, whose word
//!    characters are Unicode letters, combining marks, decimal digits, connector punctuation and
//!    ZWJ/ZWNJ; this file reproduces that for ASCII exactly and for the rest approximately (see
//!    `is_word_char`: 1,567 assigned code points, mostly other scripts' marks, still differ);
//! 5. collapse whitespace: split on Python whitespace (Unicode White_Space plus U+001C..U+001F,
//!    which Python also treats as spaces) and join with single spaces.
//!
//! **Tokens.** The normalized string split on spaces. For F1 every token goes through nltk's
//! Porter stemmer ([`porter_stem`]); for BLEU-1 tokens are not stemmed.
//!
//! **Token F1** ([`f1_score`]): multiset (Counter) intersection of the stemmed tokens;
//! 0 when it is empty (so also when either side has no tokens); otherwise
//! precision = common / |prediction|, recall = common / |truth|, F1 = 2PR / (P + R), computed
//! with the same floating-point operations in the same order as the Python code.
//!
//! **Per category** ([`score`]), as `eval_question_answering` does:
//! * 1 (multi-hop): [`f1_multi`]: prediction and truth are each split on `,` (parts stripped);
//!   score = mean over truth parts of the best [`f1_score`] against any prediction part.
//!   The mean is numpy's (pairwise summation), reproduced exactly.
//! * 2 (temporal), 4 (single-hop): [`f1_score`] of the whole strings.
//! * 3 (open-domain): the truth is first cut to the text before its first `;`
//!   (`answer.split(';')[0].strip()`), then [`f1_score`].
//! * 5 (adversarial): 1.0 when the lowercased prediction contains one of
//!   [`ADVERSARIAL_PHRASES`] (`"no information available"`, `"not mentioned"`), else 0.0;
//!   the answer is not looked at. This is a plain substring test, exactly as in the official
//!   code: "not explicitly mentioned" or "no info" score 0, "It is not mentioned." scores 1.
//! * any other id: the official code raises `ValueError`; [`try_score`] returns
//!   [`MetricsError::UnknownCategory`], [`score`] returns 0 for both metrics.
//!
//! **BLEU-1** ([`bleu1`]; not in the official LoCoMo code, which reports F1 only): what
//! `nltk.translate.bleu_score.sentence_bleu([truth_tokens], prediction_tokens, weights=(1, 0, 0, 0))`
//! returns without smoothing, where both token lists are the *normalized, unstemmed* tokens
//! above (so `"The cat!"` and `"cat"` are the same one token). That is clipped unigram precision
//! times the brevity penalty: BP = 1 if |pred| > |truth| else exp(1 - |truth| / |pred|); 0 when
//! the prediction is empty or shares no token with the truth. The same truth as for F1 is used
//! (category 3: the part before `;`; category 1: the whole string, whose commas normalization
//! deletes). For category 5 BLEU-1 repeats the 0/1 abstention score: there is no reference
//! answer to compare against (the data's `adversarial_answer` is the *wrong* answer).
//! (Mem0's LoCoMo scripts compute BLEU-1 differently: nltk `word_tokenize` on lowercased raw
//! text, with smoothing `method1`; their numbers are not comparable with these.)
//!
//! **Aggregation** ([`Totals`]): per category, count and sums; a mean is sum / count, as
//! `evaluation_stats.py` divides the per-category accumulated score by the category's question
//! count. The overall mean is micro-averaged over all items (category 5 included, as the
//! official "Overall accuracy"); [`Totals::subtotal`] gives e.g. categories 1-4 only, the set
//! most later papers report.
//!
//! Nothing here panics: empty strings, any Unicode and digits are valid input everywhere.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize, Serializer};

/// Category ids as the official evaluation code uses them (other papers name them differently).
pub const CATEGORY_MULTI_HOP: u8 = 1;
/// Temporal reasoning questions.
pub const CATEGORY_TEMPORAL: u8 = 2;
/// Open-domain / commonsense questions; their answers may carry a `;`-separated rationale.
pub const CATEGORY_OPEN_DOMAIN: u8 = 3;
/// Single-hop questions.
pub const CATEGORY_SINGLE_HOP: u8 = 4;
/// Adversarial (unanswerable) questions.
pub const CATEGORY_ADVERSARIAL: u8 = 5;

/// The phrases whose presence (substring of the lowercased prediction) makes a category-5
/// prediction correct. Exactly the two the official code tests, in lowercase.
pub const ADVERSARIAL_PHRASES: [&str; 2] = ["no information available", "not mentioned"];

/// The words `normalize_answer` removes (LoCoMo's list: the SQuAD articles plus "and").
pub const REMOVED_WORDS: [&str; 4] = ["a", "an", "the", "and"];

/// The name of a category id, or `None` outside 1..=5.
pub fn category_name(category: u8) -> Option<&'static str> {
    match category {
        CATEGORY_MULTI_HOP => Some("multi-hop"),
        CATEGORY_TEMPORAL => Some("temporal"),
        CATEGORY_OPEN_DOMAIN => Some("open-domain"),
        CATEGORY_SINGLE_HOP => Some("single-hop"),
        CATEGORY_ADVERSARIAL => Some("adversarial"),
        _ => None,
    }
}

/// Errors of the scoring functions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// The official code raises `ValueError` for a category other than 1..=5.
    #[error("unknown LoCoMo question category {0} (expected 1-5)")]
    UnknownCategory(u8),
}

/// The scores of one prediction.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Score {
    /// The official LoCoMo score (token F1, multi-answer F1, or the 0/1 adversarial check).
    pub f1: f64,
    /// BLEU-1 (see the module docs; not an official LoCoMo metric).
    pub bleu1: f64,
}

// ---------------------------------------------------------------------------------------------
// Scoring entry points
// ---------------------------------------------------------------------------------------------

/// Scores `prediction` against the gold `answer` of a question of `category` (module docs
/// list the rules). Unknown categories score 0; use [`try_score`] to see them as errors.
pub fn score(category: u8, prediction: &str, answer: &str) -> Score {
    try_score(category, prediction, answer).unwrap_or_default()
}

/// [`score`], but a category outside 1..=5 is an error, as in the official code.
pub fn try_score(category: u8, prediction: &str, answer: &str) -> Result<Score, MetricsError> {
    match category {
        CATEGORY_MULTI_HOP => Ok(Score { f1: f1_multi(prediction, answer), bleu1: bleu1(prediction, answer) }),
        CATEGORY_TEMPORAL | CATEGORY_SINGLE_HOP => Ok(Score { f1: f1_score(prediction, answer), bleu1: bleu1(prediction, answer) }),
        CATEGORY_OPEN_DOMAIN => {
            let truth = category3_truth(answer);
            Ok(Score { f1: f1_score(prediction, truth), bleu1: bleu1(prediction, truth) })
        }
        CATEGORY_ADVERSARIAL => {
            let correct = if is_abstention(prediction) { 1.0 } else { 0.0 };
            Ok(Score { f1: correct, bleu1: correct })
        }
        other => Err(MetricsError::UnknownCategory(other)),
    }
}

/// The gold answer a category-3 question is scored against: the text before the first `;`,
/// stripped (`answer.split(';')[0].strip()`); the rest is the annotator's rationale.
pub fn category3_truth(answer: &str) -> &str {
    answer.split(';').next().unwrap_or("").trim_matches(is_py_space)
}

/// The category-5 rule: true when the lowercased prediction contains any of
/// [`ADVERSARIAL_PHRASES`] as a substring.
pub fn is_abstention(prediction: &str) -> bool {
    let lower = prediction.to_lowercase();
    ADVERSARIAL_PHRASES.iter().any(|phrase| lower.contains(phrase))
}

/// Python's `str(answer)` for a JSON answer value, as the official code scores it: strings as
/// they are, integers in decimal (`2022` -> `"2022"`), `true`/`false` as `True`/`False`, `null`
/// as `None`. Differences from Python, which LoCoMo's data never hits: floats use Rust's
/// shortest form (`1e20`, where Python writes `1e+20`), and arrays/objects are JSON text rather
/// than Python reprs.
pub fn answer_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "None".to_string(),
        serde_json::Value::Bool(true) => "True".to_string(),
        serde_json::Value::Bool(false) => "False".to_string(),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => format!("{f:?}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Normalization and tokens
// ---------------------------------------------------------------------------------------------

/// LoCoMo's `normalize_answer` (rules 1-5 in the module docs).
pub fn normalize_answer(s: &str) -> String {
    // 1. Commas are deleted before anything else.
    let no_commas = s.replace(',', "");
    // 2. Lowercase.
    let lower = no_commas.to_lowercase();
    // 3. Delete ASCII punctuation (Python's `string.punctuation` is exactly these 32 characters).
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // 4. Replace the whole words a / an / the / and by a space. A regex `\b(...)\b` match is
    //    exactly a maximal run of word characters equal to one of the words, since there is no
    //    word boundary inside such a run.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut run = String::new();
    for c in no_punct.chars() {
        if is_word_char(c) {
            run.push(c);
        } else {
            flush_word(&mut no_articles, &mut run);
            no_articles.push(c);
        }
    }
    flush_word(&mut no_articles, &mut run);
    // 5. Collapse whitespace the way Python's `' '.join(text.split())` does.
    no_articles.split(is_py_space).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ")
}

fn flush_word(out: &mut String, run: &mut String) {
    if REMOVED_WORDS.contains(&run.as_str()) {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// The normalized tokens of `s` (unstemmed; BLEU-1 uses these).
pub fn normalized_tokens(s: &str) -> Vec<String> {
    normalize_answer(s).split(' ').filter(|t| !t.is_empty()).map(str::to_string).collect()
}

/// The stemmed normalized tokens of `s` (token F1 uses these).
pub fn stemmed_tokens(s: &str) -> Vec<String> {
    normalize_answer(s).split(' ').filter(|t| !t.is_empty()).map(porter_stem).collect()
}

/// Python's `str.isspace()`: Unicode White_Space plus the four ASCII information separators
/// U+001C..U+001F (checked against CPython 3.11 over every code point).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A word character for the `\b` of the `regex` module (Python), which LoCoMo uses to find
/// the removed words: `\w` = Alphabetic + Mark (Mn, Mc, Me) + Decimal_Number +
/// Connector_Punctuation + Join_Control. `char::is_alphanumeric` is Alphabetic + all of
/// Numeric, so this removes the commonest Other_Number characters (superscripts, vulgar
/// fractions, circled numbers) and adds the combining-mark blocks Latin text uses (NFD accents),
/// ZWNJ/ZWJ and the connector punctuation characters.
///
/// Unsure/approximate: marks of other scripts that are not Alphabetic, Other_Number characters
/// outside the listed ranges, and code points whose Unicode version differs between Rust and
/// the `regex` module still differ. That matters only for a character directly touching the
/// ASCII words a/an/the/and (e.g. `"the\u{0301}"` is kept whole; `"a²"` loses its `a`).
fn is_word_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let cp = c as u32;
    // Other_Number (No): numeric for Rust, not `\w` for the regex module.
    const OTHER_NUMBER: [(u32, u32); 17] = [
        (0x00B2, 0x00B3),
        (0x00B9, 0x00B9),
        (0x00BC, 0x00BE),
        (0x2070, 0x2070),
        (0x2074, 0x2079),
        (0x2080, 0x2089),
        (0x2150, 0x215F),
        (0x2189, 0x2189),
        (0x2460, 0x249B),
        (0x24EA, 0x24FF),
        (0x2776, 0x2793),
        (0x3192, 0x3195),
        (0x3220, 0x3229),
        (0x3248, 0x324F),
        (0x3251, 0x325F),
        (0x3280, 0x3289),
        (0x32B1, 0x32BF),
    ];
    // Combining-mark blocks, connector punctuation and joiners: `\w` for the regex module.
    const EXTRA_WORD: [(u32, u32); 12] = [
        (0x0300, 0x036F), // Combining Diacritical Marks
        (0x0483, 0x0489), // Cyrillic combining marks
        (0x1AB0, 0x1AFF), // Combining Diacritical Marks Extended
        (0x1DC0, 0x1DFF), // Combining Diacritical Marks Supplement
        (0x200C, 0x200D), // ZWNJ, ZWJ (Join_Control)
        (0x203F, 0x2040), // Pc
        (0x2054, 0x2054), // Pc
        (0x20D0, 0x20FF), // Combining Diacritical Marks for Symbols
        (0xFE20, 0xFE2F), // Combining Half Marks
        (0xFE33, 0xFE34), // Pc
        (0xFE4D, 0xFE4F), // Pc
        (0xFF3F, 0xFF3F), // Pc (fullwidth low line)
    ];
    let within = |ranges: &[(u32, u32)]| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&cp));
    if within(&OTHER_NUMBER) {
        return false;
    }
    c.is_alphanumeric() || within(&EXTRA_WORD)
}

// ---------------------------------------------------------------------------------------------
// F1 and BLEU-1
// ---------------------------------------------------------------------------------------------

/// LoCoMo's `f1_score`: token F1 over stemmed normalized tokens (0 when nothing overlaps).
pub fn f1_score(prediction: &str, ground_truth: &str) -> f64 {
    let pred = stemmed_tokens(prediction);
    let truth = stemmed_tokens(ground_truth);
    let num_same = common_count(&pred, &truth);
    if num_same == 0 {
        return 0.0;
    }
    // Same operations and order as Python: `1.0 * n / len`, then `(2 * p * r) / (p + r)`.
    let precision = 1.0 * num_same as f64 / pred.len() as f64;
    let recall = 1.0 * num_same as f64 / truth.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// The share of `of`'s stemmed normalized tokens that `text` also has (0 when `of` has none).
pub fn kept_share(text: &str, of: &str) -> f64 {
    let kept = stemmed_tokens(of);
    if kept.is_empty() {
        return 0.0;
    }
    common_count(&stemmed_tokens(text), &kept) as f64 / kept.len() as f64
}

/// LoCoMo's `f1` (category 1): both sides split on `,` and stripped; mean over the truth parts
/// of the best [`f1_score`] against any prediction part. A part that normalizes to nothing
/// (e.g. from a trailing comma, or a part that is just "the") scores 0 and still counts.
pub fn f1_multi(prediction: &str, ground_truth: &str) -> f64 {
    let predictions: Vec<&str> = prediction.split(',').map(|p| p.trim_matches(is_py_space)).collect();
    let best: Vec<f64> = ground_truth
        .split(',')
        .map(|g| g.trim_matches(is_py_space))
        .map(|g| predictions.iter().map(|p| f1_score(p, g)).fold(0.0, f64::max))
        .collect();
    numpy_mean(&best)
}

/// nltk `sentence_bleu([truth], prediction, weights=(1, 0, 0, 0))` without smoothing, on
/// normalized unstemmed tokens: brevity penalty × clipped unigram precision.
///
/// nltk computes `bp * exp(fsum(w_n * log(p_n)))`; the zero-weighted orders contribute
/// `0 * log(tiny) = -0.0`, so this is `bp * exp(ln(p_1))`, evaluated the same way here (it can
/// differ from `bp * p_1` in the last bit).
pub fn bleu1(prediction: &str, ground_truth: &str) -> f64 {
    let hyp = normalized_tokens(prediction);
    let reference = normalized_tokens(ground_truth);
    let numerator = common_count(&hyp, &reference);
    // nltk returns 0 when no unigram matches (which covers an empty prediction or truth).
    if numerator == 0 {
        return 0.0;
    }
    let (c, r) = (hyp.len(), reference.len());
    let bp = if c > r { 1.0 } else { (1.0 - r as f64 / c as f64).exp() };
    let p1 = numerator as f64 / c as f64;
    bp * p1.ln().exp()
}

/// Size of the multiset intersection (Python `sum((Counter(a) & Counter(b)).values())`).
fn common_count(a: &[String], b: &[String]) -> usize {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in b {
        *counts.entry(t.as_str()).or_insert(0) += 1;
    }
    let mut same = 0;
    for t in a {
        if let Some(n) = counts.get_mut(t.as_str()) {
            if *n > 0 {
                *n -= 1;
                same += 1;
            }
        }
    }
    same
}

/// `float(np.mean(values))` bit for bit: numpy sums float64 arrays pairwise (blocks of 8,
/// unrolled 8 ways, split in halves above 128 elements); for fewer than 9 values that equals a
/// plain left-to-right sum. An empty slice gives 0 (numpy would give NaN; never reached, since
/// `str.split` always yields at least one part).
fn numpy_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    numpy_pairwise_sum(values) / values.len() as f64
}

fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

// ---------------------------------------------------------------------------------------------
// Porter stemmer (nltk `PorterStemmer()`, i.e. mode NLTK_EXTENSIONS)
// ---------------------------------------------------------------------------------------------
//
// Porter, "An algorithm for suffix stripping" (1980), steps 1a, 1b, 1c, 2, 3, 4, 5a, 5b, with the
// paper's rule semantics: within a step, the rule with the longest matching suffix is tried
// (the rule lists are ordered so that the first match is the longest), and if its condition
// fails no other rule of that step is tried. nltk's default mode differs from the paper in
// these ways, all reproduced here:
//  * words are lowercased first; words of 1 or 2 characters are returned unchanged
//    (the paper's rules would turn "is" into "i", "as" into "a");
//  * a table of irregular forms is looked up first: sky/skies -> sky, dying -> die,
//    lying -> lie, tying -> tie, news -> news, innings/inning -> inning, outings/outing ->
//    outing, cannings/canning -> canning, howe -> howe, proceed, exceed, succeed -> themselves;
//  * step 1a: a 4-letter word ending in "ies" becomes "...ie" ("ties" -> "tie", "dies" ->
//    "die"; the paper gives "ti"); longer ones still take IES -> I ("ponies" -> "poni");
//  * step 1b: "ied" -> "ie" in 4-letter words ("died" -> "die") and -> "i" otherwise
//    ("spied" -> "spi"), before the paper's rules;
//  * condition *o (ends cvc) also holds for a 2-letter stem vowel + consonant ("owed" -> "owe");
//  * step 1c: Y -> I only after a consonant that is not the word's first letter
//    ("happy" -> "happi", "enjoy" -> "enjoy", "cry" -> "cri"; the paper requires a vowel
//    anywhere in the stem instead, giving "enjoi" and "cry");
//  * step 2: "alli" -> "al" is tried first and, if it applies, step 2 runs again on the result;
//    "bli" -> "ble" replaces the paper's "abli" -> "able" (Porter's later revision);
//    added rules "fulli" -> "ful" and "logi" -> "log" (the latter with its condition m > 0
//    tested on the stem *including* the "l": "geology" -> "geolog");
//  * step 5a and 5b as published; 5b tests m > 1 on the word minus its last letter.
// Letters: a, e, i, o, u are vowels; y is a vowel when it follows a consonant (a y at the start
// is a consonant); every other character, non-ASCII ones included, is a consonant. Indexing is
// by Unicode scalar value, as Python indexes `str`.

/// nltk's `PorterStemmer().stem(word)` (default NLTK_EXTENSIONS mode).
pub fn porter_stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(stem) = irregular_form(&lower) {
        return stem.to_string();
    }
    if word.chars().count() <= 2 {
        return lower;
    }
    let mut w: Vec<char> = lower.chars().collect();
    w = step1a(&w);
    w = step1b(&w);
    w = step1c(&w);
    w = step2(&w);
    w = step3(&w);
    w = step4(&w);
    w = step5a(&w);
    w = step5b(&w);
    w.into_iter().collect()
}

fn irregular_form(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

fn is_vowel_letter(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Whether `w[i]` is a consonant (see the letter rules above). Iterative over runs of y.
fn is_consonant(w: &[char], i: usize) -> bool {
    let c = w[i];
    if is_vowel_letter(c) {
        return false;
    }
    if c != 'y' {
        return true;
    }
    let mut negate = false;
    let mut j = i;
    while j > 0 && w[j] == 'y' {
        negate = !negate;
        j -= 1;
    }
    is_vowel_letter(w[j]) == negate
}

fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let consonant = if is_vowel_letter(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(consonant);
    }
    flags
}

/// m in [C](VC)^m[V]: the number of vowel-consonant transitions.
fn measure(stem: &[char]) -> usize {
    consonant_flags(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[char]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// Condition *o: the stem ends consonant-vowel-consonant, the last not w, x or y; nltk also
/// accepts a 2-letter stem vowel-consonant.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3 && is_consonant(w, n - 3) && !is_consonant(w, n - 2) && is_consonant(w, n - 1) && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

fn with_suffix(stem: &[char], replacement: &str) -> Vec<char> {
    let mut out = stem.to_vec();
    out.extend(replacement.chars());
    out
}

type Condition<'a> = &'a dyn Fn(&[char]) -> bool;

/// nltk's `_apply_rule_list`: the first rule whose suffix matches decides; its condition is
/// tested on the stem (word minus suffix) and, if it fails, the word is returned unchanged.
/// The pseudo-suffix `"*d"` matches a word ending in a double consonant (stem = word minus
/// both letters); like nltk, a word that literally ends in "*d" would match it too.
fn apply_rules(word: &[char], rules: &[(&str, &str, Condition<'_>)]) -> Vec<char> {
    for &(suffix, replacement, condition) in rules {
        if suffix == "*d" && ends_double_consonant(word) {
            let stem = &word[..word.len() - 2];
            return if condition(stem) { with_suffix(stem, replacement) } else { word.to_vec() };
        }
        if ends_with(word, suffix) {
            let stem = &word[..word.len() - suffix.chars().count()];
            return if condition(stem) { with_suffix(stem, replacement) } else { word.to_vec() };
        }
    }
    word.to_vec()
}

fn always(_: &[char]) -> bool {
    true
}

fn m_gt_0(stem: &[char]) -> bool {
    measure(stem) > 0
}

fn m_gt_1(stem: &[char]) -> bool {
    measure(stem) > 1
}

fn step1a(w: &[char]) -> Vec<char> {
    // nltk: "ties" -> "tie", "dies" -> "die" (the paper: "ti", "di").
    if w.len() == 4 && ends_with(w, "ies") {
        return with_suffix(&w[..1], "ie");
    }
    apply_rules(w, &[("sses", "ss", &always), ("ies", "i", &always), ("ss", "ss", &always), ("s", "", &always)])
}

fn step1b(w: &[char]) -> Vec<char> {
    // nltk: "died" -> "die", "spied" -> "spi".
    if ends_with(w, "ied") {
        let stem = &w[..w.len() - 3];
        return with_suffix(stem, if w.len() == 4 { "ie" } else { "i" });
    }
    // (m>0) EED -> EE; if the condition fails the word is left alone (no ED rule).
    if ends_with(w, "eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 { with_suffix(stem, "ee") } else { w.to_vec() };
    }
    // (*v*) ED -> ; (*v*) ING -> ; then the clean-up rules on the shortened stem.
    let mut stem: Option<&[char]> = None;
    for suffix in ["ed", "ing"] {
        if ends_with(w, suffix) {
            let candidate = &w[..w.len() - suffix.len()];
            if contains_vowel(candidate) {
                stem = Some(candidate);
                break;
            }
        }
    }
    let Some(stem) = stem else {
        return w.to_vec();
    };
    // contains_vowel guarantees the stem is not empty.
    let last = stem.last().copied().unwrap_or(' ');
    let last_str = last.to_string();
    let single_letter = |_: &[char]| !matches!(last, 'l' | 's' | 'z');
    let add_e = |s: &[char]| measure(s) == 1 && ends_cvc(s);
    apply_rules(
        stem,
        &[
            ("at", "ate", &always),
            ("bl", "ble", &always),
            ("iz", "ize", &always),
            // (*d and not (*L or *S or *Z)) -> single letter
            ("*d", &last_str, &single_letter),
            // (m=1 and *o) -> E
            ("", "e", &add_e),
        ],
    )
}

fn step1c(w: &[char]) -> Vec<char> {
    // nltk: (*c and not c) Y -> I, i.e. the y follows a consonant that is not the first letter.
    let condition = |stem: &[char]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[("y", "i", &condition)])
}

fn step2(w: &[char]) -> Vec<char> {
    // nltk: ALLI -> AL first, then step 2 again on the result.
    if ends_with(w, "alli") && measure(&w[..w.len() - 4]) > 0 {
        return step2(&with_suffix(&w[..w.len() - 4], "al"));
    }
    // nltk's "logi" rule tests m > 0 on the word minus "ogi" (the stem keeps its "l").
    let logi = |_: &[char]| w.len() >= 3 && measure(&w[..w.len() - 3]) > 0;
    apply_rules(
        w,
        &[
            ("ational", "ate", &m_gt_0),
            ("tional", "tion", &m_gt_0),
            ("enci", "ence", &m_gt_0),
            ("anci", "ance", &m_gt_0),
            ("izer", "ize", &m_gt_0),
            ("bli", "ble", &m_gt_0),
            ("alli", "al", &m_gt_0),
            ("entli", "ent", &m_gt_0),
            ("eli", "e", &m_gt_0),
            ("ousli", "ous", &m_gt_0),
            ("ization", "ize", &m_gt_0),
            ("ation", "ate", &m_gt_0),
            ("ator", "ate", &m_gt_0),
            ("alism", "al", &m_gt_0),
            ("iveness", "ive", &m_gt_0),
            ("fulness", "ful", &m_gt_0),
            ("ousness", "ous", &m_gt_0),
            ("aliti", "al", &m_gt_0),
            ("iviti", "ive", &m_gt_0),
            ("biliti", "ble", &m_gt_0),
            ("fulli", "ful", &m_gt_0),
            ("logi", "log", &logi),
        ],
    )
}

fn step3(w: &[char]) -> Vec<char> {
    apply_rules(
        w,
        &[
            ("icate", "ic", &m_gt_0),
            ("ative", "", &m_gt_0),
            ("alize", "al", &m_gt_0),
            ("iciti", "ic", &m_gt_0),
            ("ical", "ic", &m_gt_0),
            ("ful", "", &m_gt_0),
            ("ness", "", &m_gt_0),
        ],
    )
}

fn step4(w: &[char]) -> Vec<char> {
    let ion = |stem: &[char]| measure(stem) > 1 && matches!(stem.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            ("al", "", &m_gt_1),
            ("ance", "", &m_gt_1),
            ("ence", "", &m_gt_1),
            ("er", "", &m_gt_1),
            ("ic", "", &m_gt_1),
            ("able", "", &m_gt_1),
            ("ible", "", &m_gt_1),
            ("ant", "", &m_gt_1),
            ("ement", "", &m_gt_1),
            ("ment", "", &m_gt_1),
            ("ent", "", &m_gt_1),
            // (m>1 and (*S or *T)) ION ->
            ("ion", "", &ion),
            ("ou", "", &m_gt_1),
            ("ism", "", &m_gt_1),
            ("ate", "", &m_gt_1),
            ("iti", "", &m_gt_1),
            ("ous", "", &m_gt_1),
            ("ive", "", &m_gt_1),
            ("ize", "", &m_gt_1),
        ],
    )
}

fn step5a(w: &[char]) -> Vec<char> {
    // (m>1) E -> ; (m=1 and not *o) E ->
    if ends_with(w, "e") {
        let stem = &w[..w.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w.to_vec()
}

fn step5b(w: &[char]) -> Vec<char> {
    // (m > 1 and *d and *L) -> single letter; nltk measures the word minus its last letter.
    let condition = |_: &[char]| !w.is_empty() && measure(&w[..w.len() - 1]) > 1;
    apply_rules(w, &[("ll", "l", &condition)])
}

// ---------------------------------------------------------------------------------------------
// Aggregation
// ---------------------------------------------------------------------------------------------

/// Count and means of a set of scores.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Number of scored items.
    pub count: usize,
    /// Mean [`Score::f1`] (0 when `count` is 0).
    pub f1: f64,
    /// Mean [`Score::bleu1`] (0 when `count` is 0).
    pub bleu1: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    count: usize,
    f1: f64,
    bleu1: f64,
}

impl Sums {
    fn summary(&self) -> Summary {
        if self.count == 0 {
            return Summary::default();
        }
        Summary { count: self.count, f1: self.f1 / self.count as f64, bleu1: self.bleu1 / self.count as f64 }
    }
}

/// Scores accumulated per category id and overall. Serializes (serde, e.g. to JSON) as
/// `{"overall": {"count", "f1", "bleu1"}, "by_category": {"1": {"name", "count", "f1", "bleu1"}, ...}}`
/// with means, not sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    by_category: BTreeMap<u8, Sums>,
}

impl Totals {
    /// No items yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one scored item of `category`. Scores are summed in the order they are added, as
    /// the official statistics script accumulates them.
    pub fn add(&mut self, category: u8, score: Score) {
        let sums = self.by_category.entry(category).or_default();
        sums.count += 1;
        sums.f1 += score.f1;
        sums.bleu1 += score.bleu1;
    }

    /// Scores `prediction` with [`score`], adds it and returns it.
    pub fn record(&mut self, category: u8, prediction: &str, answer: &str) -> Score {
        let s = score(category, prediction, answer);
        self.add(category, s);
        s
    }

    /// Adds all of `other`'s items (e.g. from another conversation or thread).
    pub fn merge(&mut self, other: &Totals) {
        for (&category, theirs) in &other.by_category {
            let ours = self.by_category.entry(category).or_default();
            ours.count += theirs.count;
            ours.f1 += theirs.f1;
            ours.bleu1 += theirs.bleu1;
        }
    }

    /// Total number of items.
    pub fn count(&self) -> usize {
        self.by_category.values().map(|s| s.count).sum()
    }

    /// The summary of one category, if it has items.
    pub fn category(&self, category: u8) -> Option<Summary> {
        self.by_category.get(&category).map(Sums::summary)
    }

    /// The category ids that have items, ascending.
    pub fn categories(&self) -> Vec<u8> {
        self.by_category.keys().copied().collect()
    }

    /// Micro-average over every item (all categories, 5 included), as the official
    /// "Overall accuracy": the per-category sums are added in the official order 4, 1, 2, 3, 5
    /// (then any other ids ascending) and divided by the item count.
    pub fn overall(&self) -> Summary {
        let mut order: Vec<u8> = vec![4, 1, 2, 3, 5];
        order.extend(self.by_category.keys().copied().filter(|c| !(1..=5).contains(c)));
        self.sum_over(&order)
    }

    /// Micro-average over the items of the given categories (e.g. `&[1, 2, 3, 4]`, the set
    /// most papers report), summed in the order given.
    pub fn subtotal(&self, categories: &[u8]) -> Summary {
        self.sum_over(categories)
    }

    fn sum_over(&self, order: &[u8]) -> Summary {
        let mut total = Sums::default();
        let mut seen: Vec<u8> = Vec::new();
        for category in order {
            if seen.contains(category) {
                continue;
            }
            seen.push(*category);
            if let Some(s) = self.by_category.get(category) {
                total.count += s.count;
                total.f1 += s.f1;
                total.bleu1 += s.bleu1;
            }
        }
        total.summary()
    }
}

#[derive(Serialize)]
struct CategoryReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Serialize)]
struct TotalsReport {
    overall: Summary,
    by_category: BTreeMap<u8, CategoryReport>,
}

impl Serialize for Totals {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let by_category =
            self.by_category.iter().map(|(&c, s)| (c, CategoryReport { name: category_name(c), summary: s.summary() })).collect();
        TotalsReport { overall: self.overall(), by_category }.serialize(serializer)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values in these tests were produced by the official Python code path
    // (regex + nltk 3.10 PorterStemmer + numpy; nltk sentence_bleu for BLEU-1; the scratch
    // crate's `tools/oracle.py values`), and are compared exactly.

    #[test]
    fn normalization() {
        let cases = [
            ("The Cat!", "cat"),
            ("A, B and C", "b c"),
            ("an apple and a pear", "apple pear"),
            ("Andrew and the band", "andrew band"),
            ("theatre, anderson", "theatre anderson"),
            ("Don't stop", "dont stop"),
            ("well-known", "wellknown"),
            ("The_end", "theend"),
            ("1,000 people", "1000 people"),
            ("2023-05-07", "20230507"),
            ("May 7, 2023", "may 7 2023"),
            ("  multiple \t spaces\n\r here  ", "multiple spaces here"),
            ("x\u{1c}y", "x y"),
            ("no\u{a0}break\u{3000}space", "no break space"),
            ("", ""),
            ("   ", ""),
            ("A.", ""),
            ("and", ""),
            ("The. A! An?", ""),
            ("Ünïcödé Straße", "ünïcödé straße"),
            ("ΣΑΣ", "σας"),
            ("\u{2019}the\u{2019}", "\u{2019} \u{2019}"),
            ("the\u{301} a\u{b2}", "the\u{301} \u{b2}"),
            ("the1 a_b", "the1 ab"),
            ("2022", "2022"),
            ("日本 the 東京", "日本 東京"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_answer(input), want, "input {input:?}");
        }
        assert_eq!(normalized_tokens("The cat, the hat"), vec!["cat", "hat"]);
        assert!(normalized_tokens("").is_empty());
        assert_eq!(stemmed_tokens("He painted the house"), vec!["he", "paint", "hous"]);
    }

    #[test]
    fn porter_classic_vocabulary() {
        // Porter's test vocabulary / paper examples, as nltk's default mode stems them.
        let table = [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"), // the paper (and nltk's ORIGINAL_ALGORITHM mode) give "ti"
            ("caress", "caress"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("bled", "bled"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("conflated", "conflat"),
            ("troubled", "troubl"),
            ("sized", "size"),
            ("hopping", "hop"),
            ("tanned", "tan"),
            ("falling", "fall"),
            ("hissing", "hiss"),
            ("fizzed", "fizz"),
            ("failing", "fail"),
            ("filing", "file"),
            ("happy", "happi"),
            ("sky", "sky"),
            ("relational", "relat"),
            ("conditional", "condit"),
            ("rational", "ration"),
            ("valenci", "valenc"),
            ("hesitanci", "hesit"),
            ("digitizer", "digit"),
            ("conformabli", "conform"),
            ("radicalli", "radic"),
            ("differentli", "differ"),
            ("vileli", "vile"),
            ("analogousli", "analog"),
            ("vietnamization", "vietnam"),
            ("predication", "predic"),
            ("operator", "oper"),
            ("feudalism", "feudal"),
            ("decisiveness", "decis"),
            ("hopefulness", "hope"),
            ("callousness", "callous"),
            ("formaliti", "formal"),
            ("sensitiviti", "sensit"),
            ("sensibiliti", "sensibl"),
            ("triplicate", "triplic"),
            ("formative", "form"),
            ("formalize", "formal"),
            ("electriciti", "electr"),
            ("electrical", "electr"),
            ("hopeful", "hope"),
            ("goodness", "good"),
            ("revival", "reviv"),
            ("allowance", "allow"),
            ("inference", "infer"),
            ("airliner", "airlin"),
            ("gyroscopic", "gyroscop"),
            ("adjustable", "adjust"),
            ("defensible", "defens"),
            ("irritant", "irrit"),
            ("replacement", "replac"),
            ("adjustment", "adjust"),
            ("dependent", "depend"),
            ("adoption", "adopt"),
            ("homologou", "homolog"),
            ("communism", "commun"),
            ("activate", "activ"),
            ("angulariti", "angular"),
            ("homologous", "homolog"),
            ("effective", "effect"),
            ("bowdlerize", "bowdler"),
            ("probate", "probat"),
            ("rate", "rate"),
            ("cease", "ceas"),
            ("controll", "control"),
            ("roll", "roll"),
            ("generalizations", "gener"),
            ("oscillators", "oscil"),
        ];
        assert!(table.len() >= 60);
        for (word, want) in table {
            assert_eq!(porter_stem(word), want, "word {word:?}");
        }
    }

    #[test]
    fn porter_nltk_extensions() {
        // Where nltk's default mode differs from the 1980 paper (paper result in the comment).
        let table = [
            ("dying", "die"),       // dy
            ("lying", "lie"),       // ly
            ("tying", "tie"),       // ty
            ("news", "news"),       // new
            ("skies", "sky"),       // ski
            ("innings", "inning"),  // in
            ("outings", "outing"),  // out
            ("canning", "canning"), // can
            ("howe", "howe"),       // how
            ("proceed", "proceed"), // proce
            ("succeed", "succeed"), // succe
            ("dies", "die"),        // di
            ("died", "die"),        // di
            ("tied", "tie"),        // ti
            ("spied", "spi"),
            ("flies", "fli"),
            ("enjoy", "enjoy"),            // enjoi
            ("spy", "spi"),                // spy
            ("cry", "cri"),                // cry
            ("is", "is"),                  // i
            ("as", "as"),                  // a
            ("owed", "owe"),               // ow
            ("geology", "geolog"),         // geologi
            ("archaeology", "archaeolog"), // archaeologi
            ("hopefully", "hope"),         // hopefulli
            ("fully", "fulli"),
            ("radically", "radic"),
        ];
        for (word, want) in table {
            assert_eq!(porter_stem(word), want, "word {word:?}");
        }
        // Other inputs the paper does not cover, as nltk stems them.
        let table = [
            ("", ""),
            ("y", "y"),
            ("yy", "yy"),
            ("yyyy", "yyyi"),
            ("syzygy", "syzygi"),
            ("2022", "2022"),
            ("22nd", "22nd"),
            ("caféing", "café"),
            ("naïve", "naïv"),
            ("Painted", "paint"),
            ("succeeding", "succeed"),
            ("was", "wa"),
            ("this", "thi"),
            ("caroline", "carolin"),
        ];
        for (word, want) in table {
            assert_eq!(porter_stem(word), want, "word {word:?}");
        }
    }

    #[test]
    fn f1_examples() {
        // "painted" and "paints" both stem to "paint"; "the" is dropped: P = 2/3, R = 1.
        assert_eq!(f1_score("He painted the house", "paints house"), 0.8);
        assert_eq!(f1_score("Caroline went to the beach", "the beach"), 0.4);
        assert_eq!(f1_score("7 May 2023", "May 7, 2023"), 1.0);
        assert_eq!(f1_score("In 2022", "2022"), 0.6666666666666666);
        assert_eq!(f1_score("2022", "2022"), 1.0);
        // Counter intersection counts repeats only as often as both sides have them.
        assert_eq!(f1_score("cat cat cat", "cat"), 0.5);
        assert_eq!(f1_score("", "cat"), 0.0);
        assert_eq!(f1_score("cat", ""), 0.0);
        assert_eq!(f1_score("", ""), 0.0);
        assert_eq!(f1_score("the", "a"), 0.0);
        assert_eq!(f1_score("dog", "cat"), 0.0);
    }

    #[test]
    fn kept_share_counts_the_words_of_the_second_text_that_the_first_keeps() {
        // "lives" and "live" stem alike; Lisbon is dropped: 3 of 4.
        assert_eq!(kept_share("Maya lives in Porto.", "Maya live in Lisbon"), 0.75);
        // Only "maya" of maya / has / cat / named / miso ("a" is dropped).
        assert_eq!(kept_share("Maya moved to York.", "Maya has a cat named Miso."), 0.2);
        // A repeated word counts as often as the first text has it.
        assert_eq!(kept_share("tom", "Tom and Tom"), 0.5);
        assert_eq!(kept_share("anything", "the"), 0.0);
    }

    #[test]
    fn category1_comma_split() {
        // Truth parts: pottery -> 1, painting -> 1, swimming -> 0; mean 2/3.
        let s = score(1, "pottery, camping, painting", "pottery, painting, swimming");
        assert_eq!(s.f1, 0.6666666666666666);
        assert_eq!(s.bleu1, 0.6666666666666666);
        // Without commas the prediction is one part: each truth part scores 1/2 or 0.
        let s = score(1, "pottery camping painting", "pottery, painting, swimming");
        assert_eq!(s.f1, 0.3333333333333333);
        assert_eq!(f1_multi("beach, mountains, forest", "beach, mountains, forest"), 1.0);
        // An empty part (trailing comma) counts as a zero.
        assert_eq!(f1_multi("beach", "beach,"), 0.5);
        assert_eq!(f1_multi("", ""), 0.0);
    }

    #[test]
    fn category3_semicolon() {
        let answer = "Likely no; since this one went badly";
        assert_eq!(category3_truth(answer), "Likely no");
        assert_eq!(category3_truth("no semicolon "), "no semicolon");
        assert_eq!(category3_truth(""), "");
        assert_eq!(score(3, "likely no", answer), Score { f1: 1.0, bleu1: 1.0 });
        // The rationale is not part of the truth, so repeating it costs precision.
        assert_eq!(score(3, answer, answer), Score { f1: 0.4444444444444445, bleu1: 0.2857142857142857 });
        // Other categories do not cut at ';'.
        assert_eq!(score(4, "likely no", answer).f1, f1_score("likely no", answer));
        assert!(score(4, "likely no", answer).f1 < 1.0);
    }

    #[test]
    fn category5_adversarial() {
        assert_eq!(ADVERSARIAL_PHRASES, ["no information available", "not mentioned"]);
        for yes in ["No information available.", "NOT MENTIONED", "It is not mentioned in the conversation", "(no information available)"] {
            assert_eq!(score(5, yes, "self-care is important"), Score { f1: 1.0, bleu1: 1.0 }, "{yes:?}");
        }
        for no in ["", "self-care is important", "It was not explicitly mentioned", "No info", "unknown", "no information is available"] {
            assert_eq!(score(5, no, "self-care is important"), Score { f1: 0.0, bleu1: 0.0 }, "{no:?}");
        }
        // The answer plays no part.
        assert_eq!(score(5, "Not mentioned", ""), Score { f1: 1.0, bleu1: 1.0 });
    }

    #[test]
    fn unknown_category() {
        assert_eq!(try_score(0, "a", "a"), Err(MetricsError::UnknownCategory(0)));
        assert_eq!(try_score(6, "x", "x"), Err(MetricsError::UnknownCategory(6)));
        assert_eq!(score(6, "x", "x"), Score::default());
        assert_eq!(try_score(4, "x", "x"), Ok(Score { f1: 1.0, bleu1: 1.0 }));
    }

    #[test]
    fn bleu1_examples() {
        // Same length (BP = 1): 3 of the 4 normalized tokens match.
        assert_eq!(bleu1("the cat sat on the mat", "the cat is on the mat"), 0.75);
        // Shorter prediction: precision 1, BP = exp(1 - 4/1) = exp(-3).
        assert_eq!(bleu1("cat", "cat sat on mat"), 0.049787068367863944);
        assert_eq!(bleu1("cat", "cat sat on mat"), (-3.0f64).exp());
        // Longer prediction: no penalty; clipped precision 1/3.
        assert_eq!(bleu1("cat cat cat", "cat"), 0.3333333333333333);
        assert_eq!(bleu1("He painted the house", "paints house"), 0.3333333333333333);
        assert_eq!(bleu1("In 2022", "2022"), 0.5);
        assert_eq!(bleu1("2022", "2022"), 1.0);
        // Not stemmed: "paints" vs "painted" do not match.
        assert_eq!(bleu1("painted", "paints"), 0.0);
        assert_eq!(bleu1("", "cat"), 0.0);
        assert_eq!(bleu1("cat", ""), 0.0);
        assert_eq!(bleu1("", ""), 0.0);
    }

    #[test]
    fn answer_text_is_python_str() {
        use serde_json::json;
        assert_eq!(answer_text(&json!("Paris")), "Paris");
        assert_eq!(answer_text(&json!(2022)), "2022");
        assert_eq!(answer_text(&json!(-3)), "-3");
        assert_eq!(answer_text(&json!(2.5)), "2.5");
        assert_eq!(answer_text(&json!(2.0)), "2.0");
        assert_eq!(answer_text(&json!(true)), "True");
        assert_eq!(answer_text(&json!(null)), "None");
        assert_eq!(score(2, "2022", &answer_text(&json!(2022))).f1, 1.0);
    }

    #[test]
    fn never_panics_on_odd_input() {
        let odd = ["", ",", ";", ",,,", " , ; ", "\u{0}", "ß", "İ", "ǅ", "👍🏽", "e\u{301}", "ﬁ", "yyyyyyyy", "*d", "ied", "eed", "ll"];
        for a in odd {
            for b in odd {
                for category in 0..=6 {
                    let s = score(category, a, b);
                    assert!(s.f1.is_finite() && s.bleu1.is_finite());
                    assert!((0.0..=1.0).contains(&s.f1) && (0.0..=1.0).contains(&s.bleu1));
                }
            }
            let _ = porter_stem(a);
        }
        let long = "y".repeat(10_000);
        assert_eq!(porter_stem(&long).chars().count(), 10_000);
    }

    #[test]
    fn numpy_mean_matches_pairwise() {
        assert_eq!(numpy_mean(&[]), 0.0);
        assert_eq!(numpy_mean(&[1.0, 0.0, 0.5]), 0.5);
        // 9+ values use numpy's 8-way unrolled sum, which can differ from a left-to-right sum.
        let v: Vec<f64> = (1..=20).map(|i| 1.0 / i as f64).collect();
        let mut r = [0.0; 8];
        r.copy_from_slice(&v[..8]);
        for (j, acc) in r.iter_mut().enumerate() {
            *acc += v[8 + j];
        }
        let mut want = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &v[16..] {
            want += x;
        }
        assert_eq!(numpy_mean(&v), want / 20.0);
        let big: Vec<f64> = (0..1000).map(|i| (i % 7) as f64 / 7.0).collect();
        assert!((numpy_mean(&big) - big.iter().sum::<f64>() / 1000.0).abs() < 1e-12);
    }

    #[test]
    fn totals_aggregate_and_serialize() {
        let mut t = Totals::new();
        t.add(1, Score { f1: 1.0, bleu1: 0.5 });
        t.add(1, Score { f1: 0.0, bleu1: 0.0 });
        t.add(4, Score { f1: 0.5, bleu1: 1.0 });
        t.add(5, Score { f1: 1.0, bleu1: 1.0 });
        assert_eq!(t.count(), 4);
        assert_eq!(t.categories(), vec![1, 4, 5]);
        assert_eq!(t.category(1), Some(Summary { count: 2, f1: 0.5, bleu1: 0.25 }));
        assert_eq!(t.category(2), None);
        assert_eq!(t.overall(), Summary { count: 4, f1: 0.625, bleu1: 0.625 });
        assert_eq!(t.subtotal(&[1, 2, 3, 4]), Summary { count: 3, f1: 0.5, bleu1: 0.5 });
        assert_eq!(t.subtotal(&[]), Summary::default());
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "overall": {"count": 4, "f1": 0.625, "bleu1": 0.625},
                "by_category": {
                    "1": {"name": "multi-hop", "count": 2, "f1": 0.5, "bleu1": 0.25},
                    "4": {"name": "single-hop", "count": 1, "f1": 0.5, "bleu1": 1.0},
                    "5": {"name": "adversarial", "count": 1, "f1": 1.0, "bleu1": 1.0}
                }
            })
        );
        let mut other = Totals::new();
        assert_eq!(other.record(9, "x", "x"), Score::default());
        other.record(2, "May 2023", "May 2023");
        t.merge(&other);
        assert_eq!(t.count(), 6);
        assert_eq!(t.category(2), Some(Summary { count: 1, f1: 1.0, bleu1: 1.0 }));
        let json = serde_json::to_value(&t).unwrap();
        assert!(json["by_category"]["9"].get("name").is_none());
        assert_eq!(serde_json::to_value(Totals::new()).unwrap()["overall"]["count"], 0);
    }

    /// Where the LoCoMo file is: `$MEMLORA_LOCOMO`, else the shared data folder next to
    /// the repository.
    fn locomo8_path() -> Option<std::path::PathBuf> {
        let path = match std::env::var_os("MEMLORA_LOCOMO") {
            Some(path) => path.into(),
            None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/locomo/locomo8.json"),
        };
        path.is_file().then_some(path)
    }

    #[test]
    fn locomo8_ground_truth_scores_itself() {
        let Some(path) = locomo8_path() else {
            eprintln!("locomo8.json not found; skipping");
            return;
        };
        let text = std::fs::read_to_string(&path).expect("read locomo8.json");
        let data: serde_json::Value = serde_json::from_str(&text).expect("parse locomo8.json");
        let mut totals = Totals::new();
        let (mut checked, mut skipped_empty, mut adversarial) = (0usize, 0usize, 0usize);
        for sample in data.as_array().expect("a list of samples") {
            for qa in sample["qa"].as_array().expect("qa list") {
                let category = qa["category"].as_u64().expect("category") as u8;
                if category == CATEGORY_ADVERSARIAL {
                    // The stored (wrong) adversarial answer is not an abstention; a refusal is.
                    let wrong = answer_text(qa.get("adversarial_answer").unwrap_or(&serde_json::Value::Null));
                    assert_eq!(score(5, &wrong, "").f1, 0.0, "{wrong:?}");
                    assert_eq!(score(5, "No information available", &wrong).f1, 1.0);
                    adversarial += 1;
                    continue;
                }
                let answer = answer_text(&qa["answer"]);
                // The prediction is the truth the category is scored against.
                let truth = if category == CATEGORY_OPEN_DOMAIN { category3_truth(&answer) } else { answer.as_str() };
                let s = totals.record(category, truth, &answer);
                // Category 1 averages over comma parts, so each part must have tokens.
                let nonempty = if category == CATEGORY_MULTI_HOP {
                    answer.split(',').all(|part| !stemmed_tokens(part).is_empty())
                } else {
                    !stemmed_tokens(truth).is_empty()
                };
                if nonempty {
                    assert_eq!(s, Score { f1: 1.0, bleu1: 1.0 }, "category {category}: {answer:?}");
                    checked += 1;
                } else {
                    skipped_empty += 1;
                }
            }
        }
        eprintln!(
            "locomo8: {checked} answers of categories 1-4 score F1 = BLEU-1 = 1 against themselves; \
             {skipped_empty} empty after normalization; {adversarial} adversarial checked"
        );
        eprintln!("{}", serde_json::to_string(&totals).unwrap());
        assert!(checked > 1000);
    }
}
