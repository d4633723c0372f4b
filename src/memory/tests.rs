//! Tests of the log, the index and retrieval with a deterministic fake embedder: hashed
//! bags of words, where a few synonyms share a slot (so that paraphrases are close) and
//! words with digits are unknown (so that only BM25 can find them).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

pub(super) const DIM: usize = 64;

pub(super) fn embed(text: &str) -> Vec<f32> {
    let mut vector = vec![0f32; DIM];
    // A constant component keeps a text of unknown words from being the zero vector.
    vector[DIM - 1] = 0.05;
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let word = word.to_lowercase();
        if word.chars().any(|c| c.is_ascii_digit()) {
            continue;
        }
        let concept = match word.as_str() {
            "automobile" | "vehicle" => "car",
            "feline" | "kitty" => "cat",
            "purchased" | "acquired" => "bought",
            other => other,
        };
        let hash = concept.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
        vector[(hash % (DIM as u64 - 1)) as usize] += 1.0;
    }
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    vector.iter().map(|v| v / norm).collect()
}

fn add(text: &str) -> MemoryOp {
    add_about(text, None)
}

fn add_about(text: &str, subject: Option<&str>) -> MemoryOp {
    MemoryOp::Add {
        text: text.into(),
        subject: subject.map(Into::into),
        event_time: None,
        source: MemorySource::default(),
        image: None,
        embedding: embed(text),
        created: None,
    }
}

fn update(id: MemoryId, text: &str) -> MemoryOp {
    MemoryOp::Update { id, text: text.into(), event_time: None, embedding: embed(text) }
}

fn texts(store: &MemoryStore) -> Vec<(MemoryId, String)> {
    store.list(&MemoryFilter::default()).into_iter().map(|m| (m.id, m.text)).collect()
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_DIR).join(LOG_FILE)
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_DIR).join(INDEX_DIR)
}

/// A data dir whose store holds `texts`, one batch each, and is closed again.
fn closed_store_with(texts: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    for text in texts {
        store.apply(vec![add(text)]).unwrap();
    }
    dir
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn add_update_delete_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert!(store.is_empty());
    let applied = store
        .apply(vec![
            add_about("Caroline went to a support group", Some("Caroline")),
            add("Melanie paints sunsets"),
            add("Melanie has two kids"),
        ])
        .unwrap();
    assert_eq!(
        applied.iter().map(|a| (a.seq, a.id, a.kind)).collect::<Vec<_>>(),
        [(1, 1, OpKind::Add), (2, 2, OpKind::Add), (3, 3, OpKind::Add)]
    );
    store.apply(vec![update(2, "Melanie paints lakes"), MemoryOp::Delete { id: 3 }]).unwrap();
    assert_eq!(texts(&store), [(1, "Caroline went to a support group".into()), (2, "Melanie paints lakes".into())]);
    let melanie = store.get(2).unwrap();
    assert_eq!(melanie.embedding, embed("Melanie paints lakes"));
    assert!(store.get(3).is_none());
    assert_eq!(store.get(1).unwrap().subject.as_deref(), Some("Caroline"));
    let before = store.list(&MemoryFilter::default());
    drop(store);

    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert_eq!(store.list(&MemoryFilter::default()), before);
    assert_eq!(store.seq(), 5);
    store.verify().unwrap();
    // Id 3 was deleted, not freed.
    let applied = store.apply(vec![add("Caroline is a counselor")]).unwrap();
    assert_eq!(applied[0].id, 4);
    store.apply(vec![MemoryOp::Delete { id: 4 }]).unwrap();
    drop(store);
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert_eq!(store.apply(vec![add("new")]).unwrap()[0].id, 5);

    assert_eq!(mode(&dir.path().join(MEMORY_DIR)), 0o700);
    assert_eq!(mode(&index_path(dir.path())), 0o700);
    assert_eq!(mode(&log_path(dir.path())), 0o600);
    assert_eq!(mode(&dir.path().join(MEMORY_DIR).join(LOCK_FILE)), 0o600);
}

#[test]
fn undo_reverts_batches_newest_first_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    let mut op = add("Maya lives in Lisbon");
    if let MemoryOp::Add { event_time, .. } = &mut op {
        *event_time = Some("8 May 2023".into());
    }
    store.apply_at(vec![op, add("Maya has a cat")], 100).unwrap();
    store.apply_at(vec![add("Tom plays chess")], 200).unwrap();
    store
        .apply_at(
            vec![
                MemoryOp::Update {
                    id: 1,
                    text: "Maya lives in Porto".into(),
                    event_time: Some("9 June 2023".into()),
                    embedding: embed("Porto"),
                },
                MemoryOp::Delete { id: 2 },
                add("Maya has a dog"),
            ],
            300,
        )
        .unwrap();
    let before_last = [(1, "Maya lives in Lisbon".to_string()), (2, "Maya has a cat".into()), (3, "Tom plays chess".into())];

    let undone = store.undo_at(400).unwrap().unwrap();
    assert_eq!(undone.reverted.iter().map(|entry| entry.seq).collect::<Vec<_>>(), [4, 5, 6]);
    assert_eq!(
        undone.applied.iter().map(|a| (a.id, a.kind)).collect::<Vec<_>>(),
        [(1, OpKind::Update), (2, OpKind::Restore), (4, OpKind::Delete)]
    );
    assert_eq!(texts(&store), before_last);
    let lisbon = store.get(1).unwrap();
    assert_eq!((lisbon.event_time.as_deref(), lisbon.embedding.clone()), (Some("8 May 2023"), embed("Maya lives in Lisbon")));
    // The restored memory is the same memory, not a copy.
    let cat = store.get(2).unwrap();
    assert_eq!((cat.created, cat.embedding.clone()), (100, embed("Maya has a cat")));
    store.verify().unwrap();
    let found = store.search(&SearchQuery { text: "cat".into(), top_k: 1, ..SearchQuery::default() }).unwrap();
    assert_eq!(found[0].memory.id, 2);
    drop(store);

    // The undo is in the log: reopening keeps it, and the next undo goes one batch back.
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert_eq!(texts(&store), before_last);
    store.undo_at(500).unwrap().unwrap();
    assert_eq!(texts(&store), [(1, "Maya lives in Lisbon".to_string()), (2, "Maya has a cat".into())]);
    store.undo_at(600).unwrap().unwrap();
    assert!(store.is_empty());
    assert!(store.undo_at(700).unwrap().is_none());
    store.verify().unwrap();

    let history = store.history(None).unwrap();
    assert_eq!(history.len(), 6 + 3 + 1 + 2);
    assert_eq!(history[0].change, Change::Added { text: "Maya lives in Lisbon".into() });
    assert_eq!(history[6].undo_of, Some(6));
    let of_one: Vec<Change> = store.history(Some(1)).unwrap().into_iter().map(|entry| entry.change).collect();
    assert_eq!(
        of_one,
        [
            Change::Added { text: "Maya lives in Lisbon".into() },
            Change::Updated { old_text: "Maya lives in Lisbon".into(), new_text: "Maya lives in Porto".into() },
            Change::Updated { old_text: "Maya lives in Porto".into(), new_text: "Maya lives in Lisbon".into() },
            Change::Deleted { old_text: "Maya lives in Lisbon".into() },
        ]
    );
}

#[test]
fn imported_memories_keep_their_creation_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    let mut op = add("old memory");
    if let MemoryOp::Add { created, .. } = &mut op {
        *created = Some(1_000);
    }
    store.apply_at(vec![op], 5_000).unwrap();
    let memory = store.get(1).unwrap();
    assert_eq!((memory.created, memory.updated), (1_000, 1_000));
}

#[test]
fn update_keeps_or_replaces_event_time_and_stamps_updated() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    let mut op = add("Caroline went hiking");
    if let MemoryOp::Add { event_time, .. } = &mut op {
        *event_time = Some("7 May 2023".into());
    }
    store.apply_at(vec![op], 100).unwrap();
    store.apply_at(vec![update(1, "Caroline went hiking twice")], 200).unwrap();
    let memory = store.get(1).unwrap();
    assert_eq!((memory.created, memory.updated, memory.event_time.as_deref()), (100, 200, Some("7 May 2023")));
    store
        .apply_at(vec![MemoryOp::Update { id: 1, text: "x".into(), event_time: Some("8 May 2023".into()), embedding: embed("x") }], 300)
        .unwrap();
    assert_eq!(store.get(1).unwrap().event_time.as_deref(), Some("8 May 2023"));
}

#[test]
fn invalid_batch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.apply(vec![add("one"), add("two")]).unwrap();
    let log_before = fs::read(log_path(dir.path())).unwrap();
    let state_before = store.list(&MemoryFilter::default());

    let bad_batches = vec![
        vec![add("three"), update(99, "missing"), add("four")],
        vec![MemoryOp::Delete { id: 1 }, update(1, "deleted in this batch")],
        vec![add("   ")],
        vec![MemoryOp::Add {
            text: "short".into(),
            subject: None,
            event_time: None,
            source: MemorySource::default(),
            image: None,
            embedding: vec![1.0; 3],
            created: None,
        }],
        vec![MemoryOp::Update { id: 2, text: "nan".into(), event_time: None, embedding: vec![f32::NAN; DIM] }],
        vec![MemoryOp::Update { id: 2, text: "zero".into(), event_time: None, embedding: vec![0.0; DIM] }],
    ];
    for batch in bad_batches {
        let error = store.apply(batch).unwrap_err();
        assert!(matches!(error, MemoryError::InvalidOp { .. }), "{error}");
    }
    let error = store.apply(vec![add("three"), update(99, "missing")]).unwrap_err().to_string();
    assert_eq!(error, "memory operation 1 of the batch is invalid: no memory with id 99");

    assert_eq!(fs::read(log_path(dir.path())).unwrap(), log_before);
    assert_eq!(store.list(&MemoryFilter::default()), state_before);
    assert_eq!(store.seq(), 2);
    store.verify().unwrap();
    // The ids planned for the rejected adds were not consumed.
    assert_eq!(store.apply(vec![add("three")]).unwrap()[0].id, 3);
}

#[test]
fn second_open_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    let error = MemoryStore::open(dir.path(), DIM).unwrap_err();
    assert_eq!(error.to_string(), format!("data dir {} is in use by memlora (pid {})", dir.path().display(), std::process::id()));
    drop(store);
    MemoryStore::open(dir.path(), DIM).unwrap();
}

#[test]
fn torn_tail_is_cut_off_and_earlier_records_kept() {
    let dir = closed_store_with(&["one", "two", "three"]);

    // The last record lost its end.
    let log = fs::read(log_path(dir.path())).unwrap();
    fs::write(log_path(dir.path()), &log[..log.len() - 10]).unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert_eq!(texts(&store), [(1, "one".into()), (2, "two".into())]);
    store.verify().unwrap();
    // Appending after the cut gives a log that replays cleanly.
    store.apply(vec![add("four")]).unwrap();
    drop(store);
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    // Id 3 was never acknowledged, so it is free again.
    assert_eq!(texts(&store), [(1, "one".into()), (2, "two".into()), (3, "four".into())]);
    store.verify().unwrap();
    drop(store);

    // A batch whose last record never reached the disk is dropped whole.
    let log = fs::read_to_string(log_path(dir.path())).unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.apply(vec![add("five"), add("six"), add("seven")]).unwrap();
    drop(store);
    let full = fs::read_to_string(log_path(dir.path())).unwrap();
    let batch: Vec<&str> = full[log.len()..].lines().collect();
    fs::write(log_path(dir.path()), format!("{log}{}\n{}\n", batch[0], batch[1])).unwrap();
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert_eq!(store.len(), 3);
    assert_eq!(fs::read_to_string(log_path(dir.path())).unwrap(), log);
    store.verify().unwrap();
}

#[test]
fn garbage_in_the_middle_is_an_error_naming_the_line() {
    let dir = closed_store_with(&["one", "two"]);
    let log = fs::read_to_string(log_path(dir.path())).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    fs::write(log_path(dir.path()), format!("{}\n{{\"seq\": garbage\n{}\n", lines[0], lines[1])).unwrap();
    let error = MemoryStore::open(dir.path(), DIM).unwrap_err().to_string();
    assert!(error.starts_with(&format!("memory log {} line 2: not a log record", log_path(dir.path()).display())), "{error}");

    // A well-formed record that cannot follow its predecessor is refused too.
    fs::write(log_path(dir.path()), format!("{}\n{}\n", lines[1], lines[0])).unwrap();
    let error = MemoryStore::open(dir.path(), DIM).unwrap_err().to_string();
    assert!(error.ends_with("line 1: seq 2 follows seq 0"), "{error}");
}

#[test]
fn missing_or_damaged_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.apply(vec![add("Caroline adopted a kitty"), add("Melanie went camping")]).unwrap();
    store.apply(vec![MemoryOp::Delete { id: 1 }, add("Caroline likes pottery")]).unwrap();
    drop(store);
    let search = |store: &MemoryStore, text: &str| {
        store
            .search(&SearchQuery { text: text.into(), ..SearchQuery::default() })
            .unwrap()
            .into_iter()
            .map(|h| h.memory.id)
            .collect::<Vec<_>>()
    };

    fs::remove_dir_all(index_path(dir.path())).unwrap();
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.verify().unwrap();
    assert_eq!(search(&store, "pottery"), [3]);
    drop(store);

    // Garbage in every file of the index.
    for entry in fs::read_dir(index_path(dir.path())).unwrap() {
        fs::write(entry.unwrap().path(), b"\0garbage").unwrap();
    }
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.verify().unwrap();
    assert_eq!(search(&store, "camping"), [2]);
    drop(store);

    // Damaged segment files under an intact meta.json.
    for entry in fs::read_dir(index_path(dir.path())).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "idx" || e == "store") {
            let mut bytes = fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            fs::write(&path, bytes).unwrap();
        }
    }
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.verify().unwrap();
    assert_eq!(search(&store, "pottery"), [3]);
}

/// The same ops at the same times give byte-identical logs, so a longer log can be dropped
/// in under a store whose index saw only a prefix of it.
fn scripted(dir: &Path, batches: usize) {
    let mut store = MemoryStore::open(dir, DIM).unwrap();
    for batch in 0..batches {
        let op = match batch % 3 {
            0 | 1 => add(&format!("memory {batch} about topic{batch}")),
            _ => update((batch as u64 / 3) * 2 + 2, &format!("updated {batch} with topic{batch}")),
        };
        store.apply_at(vec![op], 1000 + batch as i64).unwrap();
    }
    if batches > 4 {
        store.apply_at(vec![MemoryOp::Delete { id: 1 }], 5000).unwrap();
    }
}

#[test]
fn index_behind_or_ahead_of_the_log_is_caught_up() {
    let long = tempfile::tempdir().unwrap();
    let short = tempfile::tempdir().unwrap();
    scripted(long.path(), 9);
    scripted(short.path(), 4);

    // Records appended to the log while the store was closed.
    fs::copy(log_path(long.path()), log_path(short.path())).unwrap();
    let store = MemoryStore::open(short.path(), DIM).unwrap();
    store.verify().unwrap();
    let expected = MemoryStore::open(long.path(), DIM).unwrap();
    assert_eq!(texts(&store), texts(&expected));
    let hits = store.search(&SearchQuery { text: "topic8".into(), ..SearchQuery::default() }).unwrap();
    assert_eq!(hits[0].memory.text, "updated 8 with topic8");
    drop(store);
    drop(expected);

    // An index ahead of the log (the log was restored from an older copy) is rebuilt.
    let older = tempfile::tempdir().unwrap();
    scripted(older.path(), 4);
    fs::copy(log_path(older.path()), log_path(short.path())).unwrap();
    let store = MemoryStore::open(short.path(), DIM).unwrap();
    store.verify().unwrap();
    assert_eq!(store.len(), 3);
}

fn search_store() -> (tempfile::TempDir, MemoryStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    store.apply_at(vec![add_about("Caroline bought a red car last week", Some("Caroline"))], 1000).unwrap();
    store.apply_at(vec![add_about("Melanie adopted a small kitty named Oliver", Some("Melanie"))], 2000).unwrap();
    store.apply_at(vec![add_about("The number on my passport is K7391X", Some("user"))], 3000).unwrap();
    store.apply_at(vec![add_about("Caroline paints in the evening", Some("Caroline"))], 4000).unwrap();
    store.apply_at(vec![add_about("Melanie went camping with her kids", Some("Melanie"))], 5000).unwrap();
    (dir, store)
}

fn hits(store: &MemoryStore, query: SearchQuery) -> Vec<MemoryId> {
    store.search(&query).unwrap().into_iter().map(|h| h.memory.id).collect()
}

#[test]
fn bm25_finds_keywords_the_embeddings_miss() {
    let (_dir, store) = search_store();
    let text = "K7391X";
    let found = store.search(&SearchQuery { text: text.into(), embedding: Some(embed(text)), top_k: 5, ..SearchQuery::default() }).unwrap();
    assert_eq!(found[0].memory.id, 3);
    assert_eq!(found[0].bm25_rank, Some(1));
    assert_ne!(found[0].vector_rank, Some(1));
}

#[test]
fn vectors_find_paraphrases_without_shared_words() {
    let (_dir, store) = search_store();
    let text = "automobile purchased";
    let found = store.search(&SearchQuery { text: text.into(), embedding: Some(embed(text)), top_k: 3, ..SearchQuery::default() }).unwrap();
    assert_eq!(found[0].memory.id, 1);
    assert_eq!((found[0].bm25_rank, found[0].vector_rank), (None, Some(1)));
}

#[test]
fn a_memory_found_by_both_rankers_comes_first() {
    let (_dir, store) = search_store();
    // BM25 alone prefers the memory that says "Caroline" twice as subject and text …
    let text = "Caroline feline";
    let query = SearchQuery { text: text.into(), embedding: Some(embed("kitty Caroline")), top_k: 5, ..SearchQuery::default() };
    let found = store.search(&query).unwrap();
    // … the fused ranking prefers one both rankers agree on.
    let both: Vec<&SearchHit> = found.iter().filter(|h| h.bm25_rank.is_some() && h.vector_rank.is_some()).collect();
    assert!(!both.is_empty());
    assert!(found[0].bm25_rank.is_some() && found[0].vector_rank.is_some(), "{found:#?}");
    for pair in found.windows(2) {
        assert!(pair[0].score > pair[1].score || (pair[0].score == pair[1].score && pair[0].memory.id < pair[1].memory.id));
    }
}

#[test]
fn filters_apply_to_both_rankers() {
    let (_dir, store) = search_store();
    let caroline = MemoryFilter { subject: Some("caroline".into()), ..MemoryFilter::default() };
    let query = |text: &str, filter: MemoryFilter| SearchQuery { text: text.into(), embedding: Some(embed(text)), top_k: 10, filter };
    let mut found = hits(&store, query("Melanie kids car paints", caroline.clone()));
    found.sort();
    assert_eq!(found, [1, 4]);
    let window = MemoryFilter { from: Some(2000), until: Some(4000), ..MemoryFilter::default() };
    let mut found = hits(&store, query("Melanie Caroline kids car paints passport", window.clone()));
    found.sort();
    assert_eq!(found, [2, 3, 4]);
    let both = MemoryFilter { subject: Some("Caroline".into()), from: Some(2000), ..MemoryFilter::default() };
    assert_eq!(hits(&store, query("Caroline car paints", both.clone())), [4]);
    assert_eq!(store.list(&both).into_iter().map(|m| m.id).collect::<Vec<_>>(), [4]);
    // The updated-time filter follows updates.
    let mut store = store;
    store.apply_at(vec![update(1, "Caroline sold her red car")], 9000).unwrap();
    let recent = MemoryFilter { from: Some(8000), time_field: TimeField::Updated, ..MemoryFilter::default() };
    assert_eq!(hits(&store, query("car", recent)), [1]);
    let created = MemoryFilter { from: Some(8000), ..MemoryFilter::default() };
    assert!(hits(&store, query("car", created)).is_empty());
}

#[test]
fn query_syntax_characters_never_fail() {
    let (_dir, store) = search_store();
    for text in [
        "\"Caroline",
        "car: \"red\" (last week)",
        "AND OR NOT -",
        "title:foo AND -bar OR (baz",
        "+*?~^[]{}\\/!",
        "K7391X)",
        "",
        "   ",
        "Caroline's car — 100%",
    ] {
        store.search(&SearchQuery { text: text.into(), embedding: Some(embed(text)), ..SearchQuery::default() }).unwrap();
    }
    assert_eq!(hits(&store, SearchQuery { text: "car: (red)".into(), ..SearchQuery::default() })[0], 1);
}

#[test]
fn empty_store_and_bad_queries() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    assert!(hits(&store, SearchQuery { text: "anything".into(), embedding: Some(embed("anything")), ..SearchQuery::default() }).is_empty());
    store.verify().unwrap();
    drop(store);
    let (_dir, store) = search_store();
    let error = store.search(&SearchQuery { text: "x".into(), embedding: Some(vec![1.0; 3]), ..SearchQuery::default() }).unwrap_err();
    assert_eq!(error.to_string(), format!("invalid memory query: the embedding has 3 values, expected {DIM}"));
    assert!(hits(&store, SearchQuery { text: "car".into(), top_k: 0, ..SearchQuery::default() }).is_empty());
}

#[test]
fn base64_round_trips() {
    use super::vectors::base64_f32::{decode, encode};
    for length in 0..10 {
        let bytes: Vec<u8> = (0..length).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
    }
    assert_eq!(encode(b"Man"), "TWFu");
    assert_eq!(encode(b"Ma"), "TWE=");
    assert!(decode("TW=u").is_none());
    assert!(decode("TWF").is_none());
}

/// What the store should hold: id → (text, event time, embedding).
type Model = BTreeMap<MemoryId, (String, Option<String>, Vec<f32>)>;

fn random_text(rng: &mut StdRng) -> String {
    const WORDS: [&str; 12] =
        ["Caroline", "Melanie", "car", "kitty", "camping", "paints", "lake", "support", "group", "kids", "pottery", "red"];
    (0..rng.random_range(1..6)).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ")
}

#[test]
fn random_batches_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = Model::new();
    let mut next_id = 1;
    let mut store = MemoryStore::open(dir.path(), DIM).unwrap();
    let mut ops_done = 0;
    while ops_done < 400 {
        let mut batch = Vec::new();
        let mut expected = model.clone();
        let mut expected_next = next_id;
        let mut valid = true;
        for _ in 0..rng.random_range(1..6) {
            // Ops cannot name memories added earlier in their own batch.
            let live: Vec<MemoryId> = expected.keys().copied().filter(|id| model.contains_key(id)).collect();
            let roll = rng.random_range(0..100);
            if roll < 50 || live.is_empty() {
                let text = random_text(&mut rng);
                let event_time = rng.random_bool(0.3).then(|| format!("{} May 2023", rng.random_range(1..29)));
                expected.insert(expected_next, (text.clone(), event_time.clone(), embed(&text)));
                expected_next += 1;
                let mut op = add(&text);
                if let MemoryOp::Add { event_time: slot, .. } = &mut op {
                    *slot = event_time;
                }
                batch.push(op);
            } else if roll < 97 {
                let id = live[rng.random_range(0..live.len())];
                if roll < 80 {
                    let text = random_text(&mut rng);
                    let entry = expected.get_mut(&id).unwrap();
                    *entry = (text.clone(), entry.1.clone(), embed(&text));
                    batch.push(update(id, &text));
                } else {
                    expected.remove(&id);
                    batch.push(MemoryOp::Delete { id });
                }
            } else {
                valid = false;
                batch.push(MemoryOp::Delete { id: next_id + 1000 });
            }
        }
        ops_done += batch.len();
        let result = store.apply(batch);
        assert_eq!(result.is_ok(), valid, "{result:?}");
        if valid {
            model = expected;
            next_id = expected_next;
        }
        let actual: Model = store.list(&MemoryFilter::default()).into_iter().map(|m| (m.id, (m.text, m.event_time, m.embedding))).collect();
        assert_eq!(actual, model);
        if rng.random_bool(0.15) {
            drop(store);
            store = MemoryStore::open(dir.path(), DIM).unwrap();
            store.verify().unwrap();
        }
    }
    store.verify().unwrap();
    // Every live memory is reachable by its own embedding.
    for (id, (_, _, embedding)) in &model {
        let found =
            store.search(&SearchQuery { embedding: Some(embedding.clone()), top_k: model.len(), ..SearchQuery::default() }).unwrap();
        assert!(found.iter().any(|hit| hit.memory.id == *id));
    }
}

const CRASH_DIR_VAR: &str = "MEMLORA_MEMORY_CRASH_DIR";

/// The writer half of `acknowledged_ops_survive_sigkill`: applies batches forever and
/// prints each acknowledged seq.
#[test]
#[ignore = "child process of acknowledged_ops_survive_sigkill"]
fn crash_writer() {
    let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else { return };
    let mut store = MemoryStore::open(Path::new(&dir), DIM).unwrap();
    let mut rng = StdRng::seed_from_u64(u64::from(std::process::id()));
    loop {
        let live: Vec<MemoryId> = store.list(&MemoryFilter::default()).iter().map(|m| m.id).take(50).collect();
        let batch: Vec<MemoryOp> = (0..rng.random_range(1..4))
            .map(|i| match rng.random_range(0..10) {
                0..6 => add(&random_text(&mut rng)),
                _ if live.len() > i => update(live[rng.random_range(i..live.len())], &random_text(&mut rng)),
                _ => add(&random_text(&mut rng)),
            })
            .collect();
        let applied = store.apply(batch).unwrap();
        println!("acked {}", applied.last().unwrap().seq);
    }
}

#[test]
fn acknowledged_ops_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut acknowledged = 0;
    for round in 0..4 {
        let mut child = Command::new(&exe)
            .args(["--exact", "memory::tests::crash_writer", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_VAR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(seq) = line.strip_prefix("acked ").and_then(|seq| seq.parse::<u64>().ok()) {
                    let _ = sender.send(seq);
                }
            }
        });
        // Kill it while it writes: after its first acknowledgement, at a random moment.
        let first = receiver.recv_timeout(Duration::from_secs(60)).expect("the writer acknowledged nothing");
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(20..400));
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let last = receiver.try_iter().last().unwrap_or(first);
        assert!(last > acknowledged, "round {round}: the writer made no progress");
        acknowledged = last;

        let store = MemoryStore::open(dir.path(), DIM).unwrap();
        assert!(store.seq() >= acknowledged, "round {round}: acknowledged seq {acknowledged}, log ends at {}", store.seq());
        store.verify().unwrap();
    }
    let log = fs::read_to_string(log_path(dir.path())).unwrap();
    let seqs: Vec<u64> =
        log.lines().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(seqs.len() as u64 >= acknowledged);
}

/// `cargo test --release -- --ignored --nocapture search_latency`: p50 of `search` (BM25 +
/// cosine + fusion) at 1k, 10k and 100k memories of dimension 384.
#[test]
#[ignore = "benchmark"]
fn search_latency() {
    const DIMENSION: usize = 384;
    const WORDS: [&str; 16] = [
        "Caroline", "Melanie", "car", "kitty", "camping", "paints", "lake", "support", "group", "kids", "pottery", "red", "May", "2023",
        "beach", "guitar",
    ];
    let mut rng = StdRng::seed_from_u64(3);
    let random_unit = |rng: &mut StdRng| {
        let v: Vec<f32> = (0..DIMENSION).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut store = MemoryStore::open(dir.path(), DIMENSION).unwrap();
    for size in [1_000, 10_000, 100_000] {
        while store.len() < size {
            let batch: Vec<MemoryOp> = (0..1000)
                .map(|i| {
                    let text: Vec<&str> = (0..8).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
                    MemoryOp::Add {
                        text: format!("{} {}", text.join(" "), i),
                        subject: Some(WORDS[rng.random_range(0..2)].into()),
                        event_time: None,
                        source: MemorySource::default(),
                        image: None,
                        embedding: random_unit(&mut rng),
                        created: None,
                    }
                })
                .collect();
            store.apply(batch).unwrap();
        }
        for (label, text, vector) in [("hybrid", true, true), ("bm25 only", true, false), ("cosine only", false, true)] {
            let mut times = Vec::new();
            for _ in 0..50 {
                let query = SearchQuery {
                    text: if text { "when did Caroline go camping at the lake".into() } else { String::new() },
                    embedding: vector.then(|| random_unit(&mut rng)),
                    top_k: 10,
                    ..SearchQuery::default()
                };
                let start = Instant::now();
                let found = store.search(&query).unwrap();
                times.push(start.elapsed());
                assert_eq!(found.len(), 10);
            }
            times.sort();
            eprintln!("{label} search p50 at {size}: {:?} (p90 {:?})", times[times.len() / 2], times[times.len() * 9 / 10]);
        }
    }
    let start = Instant::now();
    drop(store);
    let store = MemoryStore::open(dir.path(), DIMENSION).unwrap();
    eprintln!("reopen at {}: {:?}", store.len(), start.elapsed());
}

#[test]
fn int8_scan_with_rescoring_matches_exact_cosine() {
    let mut rng = StdRng::seed_from_u64(5);
    let dimension = 96;
    let mut matrix = super::vectors::Matrix::new(dimension);
    let rows: Vec<Vec<f32>> = (0..3000).map(|_| (0..dimension).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
    for row in &rows {
        matrix.push(row);
    }
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    for _ in 0..20 {
        let query: Vec<f32> = (0..dimension).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut exact: Vec<(f32, usize)> = rows.iter().enumerate().map(|(i, row)| (cosine(row, &query), i)).collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let found: Vec<usize> = matrix.nearest(&query, 20, |_| true, |row| row).into_iter().map(|(_, row)| row).collect();
        assert_eq!(found, exact[..20].iter().map(|(_, row)| *row).collect::<Vec<_>>());
    }
}

#[test]
fn the_store_can_move_into_the_worker_task() {
    fn send<T: Send>() {}
    send::<MemoryStore>();
}
