//! Crash consistency through the real binary and the real default models: `ingest` and
//! batch `remember` are killed with SIGKILL at random points, then every change the
//! process had acknowledged (printed) must be in the memory log after a restart, and the
//! search index must hold exactly what a rebuild from the log holds.
//!
//! `MEMLORA_CRASH_TRIALS` sets the number of kills (default 5, as in the test command);
//! `scripts/crash-trials` runs 50 and prints the totals.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use memlora::memory::{MemoryFilter, MemoryStore, SearchQuery, INDEX_DIR, MEMORY_DIR};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-conversation.json");
const FACTS: &str = include_str!("../assets/facts-sample.jsonl");
/// all-MiniLM-L6-v2.
const DIMENSION: usize = 384;

/// Output on a pipe, so that acknowledgements can be read as they come.
fn memlora_command(data_dir: &Path, models: &Path, args: &[&str]) -> std::process::Command {
    let mut command = common::real_memlora_command(data_dir, models, args);
    command.stdout(Stdio::piped()).stderr(Stdio::null());
    command
}

/// Statements for batch `remember`: the sentences of the bundled facts sample.
fn statements() -> Vec<String> {
    FACTS
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|record| record["prompt"].as_str().and_then(|p| p.strip_prefix("Extract the facts from: ")).map(str::to_owned))
        .collect()
}

/// Reads the child's response lines until `wanted` of them acknowledged something (or
/// the output ends), waits `delay`, kills it with SIGKILL and returns every change it
/// acknowledged, including lines that arrived before it died.
fn kill_after(mut child: std::process::Child, wanted: usize, delay: Duration, changes_of: fn(&Value) -> Vec<Value>) -> Vec<Value> {
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str::<Value>(&line) {
                let _ = lines.send(value);
            }
        }
    });
    let mut acknowledged = Vec::new();
    let mut seen = 0;
    while seen < wanted {
        match received.recv_timeout(Duration::from_secs(600)) {
            Ok(line) => {
                seen += 1;
                acknowledged.extend(changes_of(&line));
            }
            // Finished before the kill point: nothing left to interrupt.
            Err(_) => break,
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    acknowledged.extend(received.try_iter().flat_map(|line| changes_of(&line)));
    acknowledged
}

fn ingest_changes(line: &Value) -> Vec<Value> {
    line["report"]["changes"].as_array().cloned().unwrap_or_default()
}

fn batch_changes(line: &Value) -> Vec<Value> {
    match line["ok"].as_bool() {
        Some(true) => line["changes"].as_array().cloned().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Every acknowledged change is in the log with its id and kind.
fn check_kept(store: &MemoryStore, acknowledged: &[Value]) {
    let history = store.history(None).unwrap();
    for change in acknowledged {
        let seq = change["seq"].as_u64().unwrap_or_else(|| panic!("an acknowledged change without a seq: {change}"));
        let entry = history.iter().find(|entry| entry.seq == seq).unwrap_or_else(|| panic!("acknowledged change lost: {change}"));
        assert_eq!(entry.id, change["id"].as_u64().unwrap(), "{change}");
        let logged = serde_json::to_value(entry).unwrap();
        let expected = match change["kind"].as_str().unwrap() {
            "add" => "added",
            "update" => "updated",
            "delete" => "deleted",
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(logged["change"], expected, "{change}");
    }
}

#[test]
fn killed_ingests_and_batch_remembers_keep_every_acknowledged_change() {
    let Some(models) = common::real_models() else { return };
    let trials: usize = std::env::var("MEMLORA_CRASH_TRIALS").map_or(5, |v| v.parse().expect("MEMLORA_CRASH_TRIALS is a number"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let statements = statements();
    assert!(statements.len() >= 20, "the facts sample has {} statements", statements.len());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut acknowledged = Vec::new();
    let (mut ingest_trials, mut batch_trials) = (0, 0);
    for trial in 0..trials {
        // Kill points: while loading or inside the first exchange, then after a few
        // acknowledged ones, at a random moment.
        let wanted = rng.random_range(0..4);
        let delay = Duration::from_millis(rng.random_range(0..2_500));
        let changes = if trial % 2 == 0 {
            ingest_trials += 1;
            let child = memlora_command(d, &models, &["ingest", DEMO, "--json"]).spawn().unwrap();
            kill_after(child, wanted, delay, ingest_changes)
        } else {
            batch_trials += 1;
            let mut child = memlora_command(d, &models, &["batch"]).stdin(Stdio::piped()).spawn().unwrap();
            let start = rng.random_range(0..statements.len());
            let lines: String = (0..8)
                .map(|i| serde_json::json!({"id": i, "type": "remember", "text": statements[(start + i) % statements.len()]}).to_string() + "\n")
                .collect();
            let mut stdin = child.stdin.take().unwrap();
            // The pipe stays open, so batch mode is still waiting for work when it is killed.
            stdin.write_all(lines.as_bytes()).unwrap();
            let changes = kill_after(child, wanted, delay, batch_changes);
            drop(stdin);
            changes
        };
        acknowledged.extend(changes);
        // Reopening recovers from whatever the kill interrupted.
        let store = MemoryStore::open(d, DIMENSION).unwrap();
        store.verify().unwrap_or_else(|e| panic!("trial {trial}: the index disagrees with the log: {e}"));
        check_kept(&store, &acknowledged);
    }
    assert!(!acknowledged.is_empty(), "some trial ran long enough to acknowledge a change");

    // The index equals one rebuilt from the log: same answers to the same searches.
    let queries = ["Maya marathon", "Tom dog", "chemistry teacher", "running", "nurse Oslo", "rabbit"];
    let search_all = |store: &MemoryStore| -> Vec<Vec<u64>> {
        queries
            .iter()
            .map(|q| {
                let hits = store.search(&SearchQuery { text: (*q).into(), top_k: 10, ..SearchQuery::default() }).unwrap();
                hits.iter().map(|hit| hit.memory.id).collect()
            })
            .collect()
    };
    let store = MemoryStore::open(d, DIMENSION).unwrap();
    let (before, listed) = (search_all(&store), store.list(&MemoryFilter::default()));
    drop(store);
    std::fs::remove_dir_all(d.join(MEMORY_DIR).join(INDEX_DIR)).unwrap();
    let rebuilt = MemoryStore::open(d, DIMENSION).unwrap();
    rebuilt.verify().unwrap();
    let memories = listed.len();
    assert_eq!((search_all(&rebuilt), rebuilt.list(&MemoryFilter::default())), (before, listed));
    println!(
        "crash trials: {trials} SIGKILLs ({ingest_trials} during ingest, {batch_trials} during batch remember); \
         {} acknowledged changes, 0 lost; the index agreed with the log after every restart and equals a rebuild from it ({} memories)",
        acknowledged.len(),
        memories
    );
}
