//! A LoCoMo evaluation run as data: the predictions (kept as JSON Lines while the run
//! goes, so that a killed run continues where it stopped) and the report built from them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::{Score, Summary, Totals};
use crate::assistant::IngestSummary;

pub use super::EvalError;

/// How answers get their context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Ingest the conversation through the memory pipeline, answer from recalled memories.
    Memory,
    /// Put as much of the conversation as fits into the prompt, newest last.
    FullContext,
}

/// One answered question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub conversation: String,
    /// Position of the QA item in its conversation.
    pub index: usize,
    pub category: u8,
    pub question: String,
    pub answer: String,
    pub prediction: String,
    pub f1: f64,
    pub bleu1: f64,
    /// Cosine of the answer's and the prediction's sentence embeddings.
    pub similarity: f64,
    pub seconds: f64,
    pub tokens: usize,
    pub memories_used: usize,
}

/// What building a conversation's memory did (memory mode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestRecord {
    pub conversation: String,
    #[serde(flatten)]
    pub summary: IngestSummary,
}

/// Appends records to a JSON Lines file, one fsync'd line each, so that a record written
/// is never lost and a torn last line (a kill mid-write) is the only possible damage.
pub struct JournalWriter {
    path: PathBuf,
    file: File,
}

impl JournalWriter {
    pub fn open(path: &Path) -> Result<JournalWriter, EvalError> {
        let file = File::options().create(true).append(true).open(path).map_err(|error| EvalError::Io {
            action: "open",
            path: path.to_owned(),
            error,
        })?;
        Ok(JournalWriter { path: path.to_owned(), file })
    }

    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), EvalError> {
        let mut line =
            serde_json::to_vec(record).map_err(|e| EvalError::Io { action: "encode", path: self.path.clone(), error: e.into() })?;
        line.push(b'\n');
        self.file.write_all(&line).and_then(|()| self.file.sync_data()).map_err(|error| EvalError::Io {
            action: "append to",
            path: self.path.clone(),
            error,
        })
    }
}

/// Every complete record of a journal; a torn last line is ignored (its item runs again).
pub fn read_journal<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, EvalError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(EvalError::Io { action: "read", path: path.to_owned(), error }),
    };
    let mut text = String::new();
    BufReader::new(file).read_to_string(&mut text).map_err(|error| EvalError::Io { action: "read", path: path.to_owned(), error })?;
    // Only a last line without its newline can be torn; a whole line that does not
    // parse (damage, or a record of another version) is an error.
    let torn = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (number, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if torn && number + 1 == lines.len() => break,
            Err(error) => return Err(EvalError::Corrupt { path: path.to_owned(), line: number + 1, reason: error.to_string() }),
        }
    }
    Ok(records)
}

/// Means per category id and overall.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Averages {
    pub count: usize,
    pub f1: f64,
    pub bleu1: f64,
    pub similarity: f64,
    pub seconds: f64,
    pub tokens: f64,
}

/// The report of a run, built from its predictions.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub by_category: BTreeMap<u8, Averages>,
    /// Categories 1–4 (what most papers report).
    pub answerable: Averages,
    pub overall: Averages,
    /// LoCoMo's official scores, aggregated as its code does.
    pub official: Totals,
    pub ingests: Vec<IngestRecord>,
    pub predictions: Vec<Prediction>,
}

impl Report {
    pub fn new(predictions: Vec<Prediction>, ingests: Vec<IngestRecord>) -> Report {
        let mut official = Totals::new();
        let mut by_category: BTreeMap<u8, Vec<&Prediction>> = BTreeMap::new();
        for prediction in &predictions {
            official.add(prediction.category, Score { f1: prediction.f1, bleu1: prediction.bleu1 });
            by_category.entry(prediction.category).or_default().push(prediction);
        }
        let answerable: Vec<&Prediction> = predictions.iter().filter(|p| (1..=4).contains(&p.category)).collect();
        Report {
            by_category: by_category.iter().map(|(category, items)| (*category, averages(items))).collect(),
            answerable: averages(&answerable),
            overall: averages(&predictions.iter().collect::<Vec<_>>()),
            official,
            ingests,
            predictions,
        }
    }

    /// The official totals of one category, when it has predictions.
    pub fn official_category(&self, category: u8) -> Option<Summary> {
        self.official.category(category)
    }
}

fn averages(items: &[&Prediction]) -> Averages {
    let count = items.len();
    if count == 0 {
        return Averages::default();
    }
    let mean = |f: fn(&Prediction) -> f64| items.iter().map(|p| f(p)).sum::<f64>() / count as f64;
    Averages {
        count,
        f1: mean(|p| p.f1),
        bleu1: mean(|p| p.bleu1),
        similarity: mean(|p| p.similarity),
        seconds: mean(|p| p.seconds),
        tokens: mean(|p| p.tokens as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(index: usize, category: u8, f1: f64) -> Prediction {
        Prediction {
            conversation: "c".into(),
            index,
            category,
            question: "q".into(),
            answer: "a".into(),
            prediction: "p".into(),
            f1,
            bleu1: f1 / 2.0,
            similarity: 0.5,
            seconds: 1.0,
            tokens: 10,
            memories_used: 3,
        }
    }

    #[test]
    fn a_journal_keeps_complete_records_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let mut journal = JournalWriter::open(&path).unwrap();
        journal.append(&prediction(0, 1, 1.0)).unwrap();
        journal.append(&prediction(1, 2, 0.0)).unwrap();
        drop(journal);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"conversation\": \"c\", \"ind");
        std::fs::write(&path, &text).unwrap();
        let read: Vec<Prediction> = read_journal(&path).unwrap();
        assert_eq!(read.iter().map(|p| p.index).collect::<Vec<_>>(), [0, 1]);
        // Damage before the last line is an error naming the line, never silently skipped;
        // so is a whole last line that does not parse.
        std::fs::write(&path, format!("garbage\n{}", text)).unwrap();
        assert!(read_journal::<Prediction>(&path).unwrap_err().to_string().contains("line 1"));
        std::fs::write(&path, "{\"conversation\": \"c\"}\n").unwrap();
        assert!(read_journal::<Prediction>(&path).unwrap_err().to_string().contains("line 1"));
        assert!(read_journal::<Prediction>(&dir.path().join("missing.jsonl")).unwrap().is_empty());
    }

    #[test]
    fn the_report_averages_by_category_and_over_the_answerable_ones() {
        let report =
            Report::new(vec![prediction(0, 1, 1.0), prediction(1, 1, 0.0), prediction(2, 4, 1.0), prediction(3, 5, 1.0)], Vec::new());
        assert_eq!(report.by_category[&1].count, 2);
        assert_eq!(report.by_category[&1].f1, 0.5);
        assert_eq!((report.answerable.count, report.answerable.f1), (3, 2.0 / 3.0));
        assert_eq!((report.overall.count, report.overall.f1), (4, 0.75));
        assert_eq!(report.official_category(4).unwrap().count, 1);
    }
}
