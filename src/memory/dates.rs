//! Relative dates in extracted facts, rewritten as absolute ones.
//!
//! A fact such as "Gina lost her job yesterday" is only true relative to the session it
//! came from; once stored, the session is gone and "yesterday" would silently drift to
//! whatever day the memory is read. So before a fact is stored, every relative date we
//! can resolve safely is written out against the session's date (the only anchor we
//! have), in the forms LoCoMo's gold answers use: "7 May 2023", "the week before
//! 9 June 2023", "the weekend before 20 May 2023", "June 2023", "2022". Expressions that
//! are ambiguous ("on Saturday", "recently", "the other day") are left alone: a wrong
//! absolute date is worse than a vague relative one.
//!
//! Plain word scanning over an ordered table of patterns; no regex needed.

use jiff::civil::{Date, Weekday};
use jiff::Span;

use crate::transcript::MONTHS;

/// A fact's text with its relative dates written out, and the day the fact happened
/// when the text names exactly one day-precision date that was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDates {
    pub text: String,
    pub event_day: Option<Date>,
    pub resolved: usize,
}

/// Words after which an inserted "on" would be doubled or ungrammatical.
const PREPOSITIONS: [&str; 8] = ["on", "since", "until", "till", "by", "before", "after", "from"];

#[derive(Clone, Copy)]
enum Word {
    Is(&'static str),
    OneOf(&'static [&'static str]),
    /// A small number, as digits or as an English word.
    Count,
    Weekday,
}

#[derive(Clone, Copy, PartialEq)]
enum Rel {
    Last,
    This,
    Next,
}

#[derive(Clone, Copy)]
enum Rule {
    DayOffset(i64),
    /// "N days ago" (-1) or "in N days" (+1).
    DaysCounted(i64),
    /// "a few days ago": the quantity is vague, so keep the words and anchor them.
    VagueDaysAgo,
    Week(&'static str),
    WeeksAgo,
    Weekend(Rel),
    MonthOffset(i64),
    MonthsCounted(i64),
    YearOffset(i64),
    YearsAgo,
    Weekday(Rel),
}

use Word::{Count, Is, OneOf};
const DAY: Word = OneOf(&["day", "days"]);
const WEEK: Word = OneOf(&["week", "weeks"]);
const MONTH: Word = OneOf(&["month", "months"]);
const YEAR: Word = OneOf(&["year", "years"]);

/// Tried in order at each word; longer phrases come before their own tails.
const PATTERNS: &[(&[Word], Rule)] = &[
    (&[Is("the"), Is("day"), Is("before"), Is("yesterday")], Rule::DayOffset(-2)),
    (&[Is("the"), Is("day"), Is("after"), Is("tomorrow")], Rule::DayOffset(2)),
    (&[Is("earlier"), Is("today")], Rule::DayOffset(0)),
    (&[Is("this"), OneOf(&["morning", "afternoon", "evening"])], Rule::DayOffset(0)),
    (&[Is("last"), Is("night")], Rule::DayOffset(-1)),
    (&[Is("yesterday")], Rule::DayOffset(-1)),
    (&[OneOf(&["today", "tonight"])], Rule::DayOffset(0)),
    (&[Is("tomorrow")], Rule::DayOffset(1)),
    (&[Is("a"), Is("few"), Is("days"), Is("ago")], Rule::VagueDaysAgo),
    (&[Is("a"), Is("couple"), Is("of"), Is("days"), Is("ago")], Rule::VagueDaysAgo),
    (&[Is("a"), Is("couple"), Is("days"), Is("ago")], Rule::VagueDaysAgo),
    (&[Is("several"), Is("days"), Is("ago")], Rule::VagueDaysAgo),
    (&[Count, DAY, Is("ago")], Rule::DaysCounted(-1)),
    (&[Is("in"), Count, DAY], Rule::DaysCounted(1)),
    (&[Is("last"), Is("week")], Rule::Week("the week before")),
    (&[Is("next"), Is("week")], Rule::Week("the week after")),
    (&[Is("this"), Is("week")], Rule::Week("the week of")),
    (&[Count, WEEK, Is("ago")], Rule::WeeksAgo),
    (&[Is("last"), Is("weekend")], Rule::Weekend(Rel::Last)),
    (&[Is("this"), Is("weekend")], Rule::Weekend(Rel::This)),
    (&[Is("next"), Is("weekend")], Rule::Weekend(Rel::Next)),
    (&[Is("last"), Is("month")], Rule::MonthOffset(-1)),
    (&[Is("this"), Is("month")], Rule::MonthOffset(0)),
    (&[Is("next"), Is("month")], Rule::MonthOffset(1)),
    (&[Count, MONTH, Is("ago")], Rule::MonthsCounted(-1)),
    (&[Is("in"), Count, MONTH], Rule::MonthsCounted(1)),
    (&[Is("last"), Is("year")], Rule::YearOffset(-1)),
    (&[Is("this"), Is("year")], Rule::YearOffset(0)),
    (&[Is("next"), Is("year")], Rule::YearOffset(1)),
    (&[Count, YEAR, Is("ago")], Rule::YearsAgo),
    (&[Is("last"), Word::Weekday], Rule::Weekday(Rel::Last)),
    (&[Is("this"), Word::Weekday], Rule::Weekday(Rel::This)),
    (&[Is("next"), Word::Weekday], Rule::Weekday(Rel::Next)),
];

/// What a pattern's wildcards picked up, and where the match ends.
struct Match {
    end_word: usize,
    count: Option<i64>,
    weekday: Option<Weekday>,
}

enum Resolution {
    Day(Date),
    Phrase(String),
}

pub fn resolve_relative_dates(text: &str, session_day: Date) -> ResolvedDates {
    let words = word_spans(text);
    let mut out = String::with_capacity(text.len() + 32);
    let (mut copied_to, mut resolved, mut days) = (0, 0, Vec::new());
    let mut i = 0;
    while i < words.len() {
        let found = PATTERNS.iter().find_map(|(pattern, rule)| {
            let m = match_at(text, &words, i, pattern)?;
            let start = words[i].0;
            let kept_words = &text[start..words[m.end_word].0];
            Some((m.end_word, apply(*rule, &m, session_day, kept_words)?))
        });
        let Some((end_word, resolution)) = found else {
            i += 1;
            continue;
        };
        let (start, end) = (words[i].0, words[end_word].1);
        let mut replacement = match resolution {
            Resolution::Day(day) => {
                days.push(day);
                let after_preposition = i > 0 && {
                    let (p_start, p_end) = words[i - 1];
                    text[p_end..start].chars().all(char::is_whitespace)
                        && PREPOSITIONS.iter().any(|p| text[p_start..p_end].eq_ignore_ascii_case(p))
                };
                if after_preposition {
                    format_day(day)
                } else {
                    format!("on {}", format_day(day))
                }
            }
            Resolution::Phrase(phrase) => phrase,
        };
        if text[start..].starts_with(char::is_uppercase) {
            replacement = capitalize(&replacement);
        }
        out.push_str(&text[copied_to..start]);
        out.push_str(&replacement);
        copied_to = end;
        resolved += 1;
        i = end_word + 1;
    }
    out.push_str(&text[copied_to..]);
    let event_day = if days.len() == 1 { days.first().copied() } else { None };
    ResolvedDates { text: out, event_day, resolved }
}

/// Byte ranges of maximal runs of word characters (as regex `\w`), so "todayish" never
/// matches "today".
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (at, c) in text.char_indices() {
        match (c.is_alphanumeric() || c == '_', start) {
            (true, None) => start = Some(at),
            (false, Some(s)) => {
                spans.push((s, at));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, text.len()));
    }
    spans
}

fn match_at(text: &str, words: &[(usize, usize)], first: usize, pattern: &[Word]) -> Option<Match> {
    let mut m = Match { end_word: first, count: None, weekday: None };
    for (offset, expected) in pattern.iter().enumerate() {
        let index = first + offset;
        let &(start, end) = words.get(index)?;
        // Words of one phrase must be separated by plain spaces: "last, week" is two thoughts.
        if offset > 0 && !text[words[index - 1].1..start].chars().all(char::is_whitespace) {
            return None;
        }
        let word = &text[start..end];
        match expected {
            Is(literal) if word.eq_ignore_ascii_case(literal) => {}
            OneOf(options) if options.iter().any(|o| word.eq_ignore_ascii_case(o)) => {}
            Count if !follows_decimal_point(text, start) => m.count = Some(parse_count(word)?),
            Word::Weekday => m.weekday = Some(parse_weekday(word)?),
            _ => return None,
        }
        m.end_word = index;
    }
    Some(m)
}

/// "2.5 days ago" must not be read as "5 days ago".
fn follows_decimal_point(text: &str, start: usize) -> bool {
    let mut before = text[..start].chars().rev();
    matches!(before.next(), Some('.' | ',' | ':')) && before.next().is_some_and(|c| c.is_ascii_digit())
}

fn parse_count(word: &str) -> Option<i64> {
    const WORDS: [&str; 12] = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];
    if word.bytes().all(|b| b.is_ascii_digit()) {
        return word.parse().ok();
    }
    if word.eq_ignore_ascii_case("a") || word.eq_ignore_ascii_case("an") {
        return Some(1);
    }
    let index = WORDS.iter().position(|w| word.eq_ignore_ascii_case(w))?;
    i64::try_from(index + 1).ok()
}

fn parse_weekday(word: &str) -> Option<Weekday> {
    let names = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    let index = names.iter().position(|n| word.eq_ignore_ascii_case(n))?;
    Weekday::from_monday_zero_offset(i8::try_from(index).ok()?).ok()
}

/// None when the date would leave jiff's range, so the expression stays as written.
fn apply(rule: Rule, m: &Match, session: Date, kept_words: &str) -> Option<Resolution> {
    let signed_count = |sign: i64| m.count.and_then(|n| n.checked_mul(sign));
    let shift_days = |n: i64| session.checked_add(Span::new().try_days(n).ok()?).ok();
    let shift_months = |n: i64| session.checked_add(Span::new().try_months(n).ok()?).ok();
    let shift_years = |n: i64| session.checked_add(Span::new().try_years(n).ok()?).ok();
    let month_of = |d: Date| format!("{} {}", month_name(d), d.year());
    let anchored = |phrase: &str| format!("{phrase} {}", format_day(session));
    let resolution = match rule {
        Rule::DayOffset(n) => Resolution::Day(shift_days(n)?),
        Rule::DaysCounted(sign) => Resolution::Day(shift_days(signed_count(sign)?)?),
        Rule::VagueDaysAgo => Resolution::Phrase(anchored(&format!("{kept_words}before"))),
        Rule::Week(phrase) => Resolution::Phrase(anchored(phrase)),
        Rule::WeeksAgo if m.count == Some(1) => Resolution::Phrase(anchored("the week before")),
        Rule::WeeksAgo => Resolution::Phrase(anchored(&format!("{kept_words}before"))),
        Rule::Weekend(Rel::Last) => Resolution::Phrase(anchored("the weekend before")),
        Rule::Weekend(rel) => {
            let on_weekend = matches!(session.weekday(), Weekday::Saturday | Weekday::Sunday);
            let phrase = if rel == Rel::This && on_weekend { "the weekend of" } else { "the weekend after" };
            Resolution::Phrase(anchored(phrase))
        }
        Rule::MonthOffset(n) => Resolution::Phrase(month_of(shift_months(n)?)),
        Rule::MonthsCounted(sign) => Resolution::Phrase(month_of(shift_months(signed_count(sign)?)?)),
        Rule::YearOffset(n) => Resolution::Phrase(shift_years(n)?.year().to_string()),
        Rule::YearsAgo => Resolution::Phrase(shift_years(signed_count(-1)?)?.year().to_string()),
        Rule::Weekday(rel) => {
            let weekday = m.weekday?;
            let day = match rel {
                Rel::Last => session.nth_weekday(-1, weekday).ok()?,
                Rel::This if session.weekday() == weekday => session,
                Rel::This | Rel::Next => session.nth_weekday(1, weekday).ok()?,
            };
            Resolution::Day(day)
        }
    };
    Some(resolution)
}

fn capitalize(phrase: &str) -> String {
    let mut chars = phrase.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

fn month_name(day: Date) -> &'static str {
    usize::try_from(day.month() - 1).ok().and_then(|i| MONTHS.get(i)).copied().unwrap_or("")
}

/// "8 May 2023".
pub fn format_day(day: Date) -> String {
    format!("{} {} {}", day.day(), month_name(day), day.year())
}

/// The day of a date as conversations and memories write it — "8 May 2023", "8 May,
/// 2023", "May 8, 2023", "2023-05-08", LoCoMo's "1:56 pm on 8 May, 2023" — read by the
/// transcripts' own parser, which wrote the exchange's date in the first place.
pub fn parse_day(text: &str) -> Option<Date> {
    let (_, seconds) = crate::transcript::parse_date_time(text)?;
    let days = Span::new().try_days(seconds.div_euclid(86_400)).ok()?;
    jiff::civil::date(1970, 1, 1).checked_add(days).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    /// Monday 8 May 2023, the running example.
    const MONDAY: Date = date(2023, 5, 8);

    fn text(input: &str, session: Date) -> String {
        resolve_relative_dates(input, session).text
    }

    fn check(session: Date, cases: &[(&str, &str)]) {
        for (input, expected) in cases {
            assert_eq!(text(input, session), *expected, "input: {input:?}");
        }
    }

    fn on_monday(cases: &[(&str, &str)]) {
        check(MONDAY, cases);
    }

    fn unchanged(inputs: &[&str]) {
        for input in inputs {
            let r = resolve_relative_dates(input, MONDAY);
            assert_eq!((r.text.as_str(), r.resolved, r.event_day), (*input, 0, None));
        }
    }

    #[test]
    fn single_days() {
        on_monday(&[
            ("Gina lost her job as a banker yesterday.", "Gina lost her job as a banker on 7 May 2023."),
            ("she starts tomorrow", "she starts on 9 May 2023"),
            ("we met the day before yesterday", "we met on 6 May 2023"),
            ("it ships the day after tomorrow!", "it ships on 10 May 2023!"),
        ]);
    }

    #[test]
    fn same_day_phrases() {
        for phrase in ["today", "this morning", "this afternoon", "this evening", "tonight", "earlier today"] {
            assert_eq!(text(&format!("ran {phrase}, twice"), MONDAY), "ran on 8 May 2023, twice");
        }
    }

    #[test]
    fn last_night_is_yesterday() {
        on_monday(&[("saw a film last night", "saw a film on 7 May 2023")]);
    }

    #[test]
    fn days_ago() {
        on_monday(&[
            ("moved 3 days ago", "moved on 5 May 2023"),
            ("moved two days ago", "moved on 6 May 2023"),
            ("moved a day ago", "moved on 7 May 2023"),
            ("moved twelve days ago", "moved on 26 April 2023"),
        ]);
    }

    #[test]
    fn days_ahead() {
        on_monday(&[("leaves in 5 days", "leaves on 13 May 2023"), ("leaves in a day", "leaves on 9 May 2023")]);
    }

    #[test]
    fn vague_days_keep_their_quantifier() {
        on_monday(&[
            ("a few days ago", "a few days before 8 May 2023"),
            ("a couple of days ago", "a couple of days before 8 May 2023"),
            ("several days ago", "several days before 8 May 2023"),
        ]);
        assert_eq!(resolve_relative_dates("a few days ago", MONDAY).event_day, None);
    }

    #[test]
    fn weeks() {
        on_monday(&[
            ("last week", "the week before 8 May 2023"),
            ("next week", "the week after 8 May 2023"),
            ("this week", "the week of 8 May 2023"),
            ("two weeks ago", "two weeks before 8 May 2023"),
            ("3 weeks ago", "3 weeks before 8 May 2023"),
            ("a week ago", "the week before 8 May 2023"),
        ]);
    }

    #[test]
    fn weekends() {
        on_monday(&[
            ("last weekend", "the weekend before 8 May 2023"),
            ("this weekend", "the weekend after 8 May 2023"),
            ("next weekend", "the weekend after 8 May 2023"),
        ]);
    }

    #[test]
    fn this_weekend_on_a_weekend_day() {
        check(date(2023, 5, 13), &[("this weekend", "the weekend of 13 May 2023"), ("next weekend", "the weekend after 13 May 2023")]);
    }

    #[test]
    fn months() {
        on_monday(&[
            ("last month", "April 2023"),
            ("this month", "May 2023"),
            ("next month", "June 2023"),
            ("three months ago", "February 2023"),
            ("in 2 months", "July 2023"),
        ]);
    }

    #[test]
    fn month_arithmetic_clamps() {
        check(date(2024, 3, 31), &[("last month", "February 2024")]);
        check(date(2023, 3, 31), &[("a month ago", "February 2023")]);
        check(date(2023, 1, 31), &[("in 1 month", "February 2023")]);
    }

    #[test]
    fn years() {
        on_monday(&[("last year", "2022"), ("this year", "2023"), ("next year", "2024"), ("five years ago", "2018")]);
        check(date(2024, 2, 29), &[("a year ago", "2023")]);
    }

    #[test]
    fn last_and_next_weekday() {
        on_monday(&[
            ("last Saturday", "on 6 May 2023"),
            ("last monday", "on 1 May 2023"),
            ("next Monday", "on 15 May 2023"),
            ("next FRIDAY", "on 12 May 2023"),
        ]);
    }

    #[test]
    fn this_weekday_looks_seven_days_ahead() {
        on_monday(&[("this Monday", "on 8 May 2023"), ("this sunday", "on 14 May 2023"), ("this Tuesday", "on 9 May 2023")]);
    }

    #[test]
    fn bare_weekdays_are_ambiguous() {
        unchanged(&["on Saturday we hiked; Sunday was rest", "Friday"]);
    }

    #[test]
    fn prepositions_are_not_doubled() {
        on_monday(&[
            ("it happened on last Saturday", "it happened on 6 May 2023"),
            ("on yesterday", "on 7 May 2023"),
            ("wait until tomorrow", "wait until 9 May 2023"),
            ("since last week", "since the week before 8 May 2023"),
            ("by, yesterday", "by, on 7 May 2023"),
        ]);
        for p in ["since", "till", "by", "before", "after", "from"] {
            assert_eq!(text(&format!("{p} today"), MONDAY), format!("{p} 8 May 2023"));
        }
    }

    #[test]
    fn capitalised_at_sentence_start() {
        on_monday(&[
            ("Yesterday Gina lost her job.", "On 7 May 2023 Gina lost her job."),
            ("Last week was hard.", "The week before 8 May 2023 was hard."),
            ("A few days ago.", "A few days before 8 May 2023."),
            ("Since Yesterday", "Since 7 May 2023"),
            ("TODAY", "On 8 May 2023"),
        ]);
    }

    #[test]
    fn year_boundaries() {
        check(date(2023, 1, 3), &[("last week", "the week before 3 January 2023"), ("last month", "December 2022")]);
        check(date(2023, 1, 1), &[("yesterday", "on 31 December 2022")]);
        check(date(2022, 12, 31), &[("tomorrow", "on 1 January 2023")]);
        check(date(2023, 1, 2), &[("last Friday", "on 30 December 2022")]);
    }

    #[test]
    fn leap_day() {
        check(date(2024, 2, 28), &[("tomorrow", "on 29 February 2024")]);
        check(date(2024, 3, 1), &[("yesterday", "on 29 February 2024")]);
    }

    #[test]
    fn unlisted_expressions_stay() {
        unchanged(&["recently, soon, the other day, last time, last, in a few days, in 2 weeks"]);
    }

    #[test]
    fn decimals_are_not_counts() {
        unchanged(&["2.5 days ago", "1,5 weeks ago", "in 1.5 months"]);
    }

    #[test]
    fn whole_words_only() {
        unchanged(&["todayish", "yesterdays", "pretomorrow", "lastweek", "in 5daysago", "last-week", "a_yesterday"]);
        on_monday(&[("yesterday's game", "on 7 May 2023's game")]);
    }

    #[test]
    fn event_day_for_exactly_one_day() {
        let r = resolve_relative_dates("Gina lost her job yesterday and moved last month", MONDAY);
        assert_eq!((r.event_day, r.resolved), (Some(date(2023, 5, 7)), 2));
        assert_eq!(resolve_relative_dates("last Saturday", MONDAY).event_day, Some(date(2023, 5, 6)));
        assert_eq!(resolve_relative_dates("in 2 days", MONDAY).event_day, Some(date(2023, 5, 10)));
    }

    #[test]
    fn event_day_none_for_several_or_coarse() {
        assert_eq!(resolve_relative_dates("yesterday and today", MONDAY).event_day, None);
        assert_eq!(resolve_relative_dates("yesterday and yesterday", MONDAY).event_day, None);
        let coarse = resolve_relative_dates("last week, last month, last year, last weekend", MONDAY);
        assert_eq!((coarse.event_day, coarse.resolved), (None, 4));
        unchanged(&["nothing here"]);
    }

    #[test]
    fn several_expressions_in_one_text() {
        let r = resolve_relative_dates("Yesterday she said that next week, not tomorrow, she flies.", MONDAY);
        assert_eq!(r.text, "On 7 May 2023 she said that the week after 8 May 2023, not on 9 May 2023, she flies.");
        assert_eq!(r.resolved, 3);
    }

    #[test]
    fn format_day_writes_locomo_style() {
        assert_eq!(format_day(MONDAY), "8 May 2023");
        assert_eq!(format_day(date(2022, 12, 31)), "31 December 2022");
    }

    #[test]
    fn parse_day_forms() {
        let forms = ["8 May 2023", "8 May, 2023", "May 8, 2023", "2023-05-08", "1:56 pm on 8 May, 2023", " 8 may 2023 ", "MAY 8 2023"];
        for input in forms {
            assert_eq!(parse_day(input), Some(MONDAY), "{input}");
        }
    }

    #[test]
    fn parse_day_rejects_nonsense() {
        let bad =
            ["", "May 2023", "31 February 2023", "8 Mayo 2023", "2023-13-01", "lunch on 8 May 2023", "8 May 2023 extra", "1:56 pm on"];
        for input in bad {
            assert_eq!(parse_day(input), None, "{input}");
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        let mut day = date(2020, 1, 1);
        while day < date(2025, 1, 1) {
            assert_eq!(parse_day(&format_day(day)), Some(day));
            day = day.tomorrow().expect("2020-2025 is in range");
        }
    }

    #[test]
    fn odd_inputs_never_panic() {
        let long = "yesterday ".repeat(20_000) + "last";
        let inputs = [
            "",
            "...!?",
            "昨日 yesterday émigré",
            "last",
            "2 days ago it rained",
            "in 99999999999 days",
            "in 99999999999999999999999 days",
            "9223372036854775807 weeks ago",
            "ÄÖÜ today ß",
            "\u{0}\u{200b}today",
            &long,
        ];
        for input in inputs {
            for session in [MONDAY, Date::MIN, Date::MAX] {
                let _ = resolve_relative_dates(input, session);
            }
            let _ = parse_day(input);
        }
        on_monday(&[("昨日 yesterday émigré", "昨日 on 7 May 2023 émigré"), ("2 days ago it rained", "on 6 May 2023 it rained")]);
        assert_eq!(resolve_relative_dates(&long, MONDAY).resolved, 20_000);
    }

    #[test]
    fn out_of_range_dates_stay_unresolved() {
        unchanged(&["in 99999999999 days", "99999999999 years ago", "in 9223372036854775807 months"]);
        check(Date::MIN, &[("yesterday", "yesterday"), ("last Sunday", "last Sunday")]);
        check(Date::MAX, &[("next year", "next year")]);
    }
}
