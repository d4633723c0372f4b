//! `memlora distill locomo` end to end on a tiny LoCoMo-format file, with a tiny random
//! sentence embedder: the training files the trainer reads, labels that follow the
//! evidence and the labelling rules, the split by conversation, refusals, and the teacher
//! path against a local fake server.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{assert_one_line_error, stderr};
use memlora::adapters::train::data::read_conversations;
use memlora::assistant::session_exchanges;
use memlora::engine::{ChatMessage, Role};
use memlora::memory::pipeline::{MemoryPipeline, PipelineSettings};
use memlora::memory::prompts::Prompts;
use serde_json::{json, Value};

/// conv-a (training) and conv-b (validation). In conv-a, with two turns per window:
/// session 1 adds "Nate has a dog." (no memory yet: no model call), then "Nate plays
/// tennis every week." (ADD), then "Nate has a dog!" (a repeat: NONE), and its last
/// window has no fact; session 2 says more about the dog (UPDATE of "Nate has a dog."),
/// adds a fact about Joanna (ADD), repeats the tennis fact word for word (known without
/// a model call) and has one fact whose evidence names no turn of the session.
fn tiny_locomo(dir: &Path) -> PathBuf {
    let turn = |id: &str, speaker: &str, text: &str| json!({"speaker": speaker, "dia_id": id, "text": text});
    let data = json!([
        {
            "sample_id": "conv-a",
            "conversation": {
                "speaker_a": "Nate", "speaker_b": "Joanna",
                "session_1_date_time": "1:56 pm on 8 May, 2023",
                "session_1": [
                    turn("D1:1", "Nate", "I have a dog."), turn("D1:2", "Joanna", "Cool!"),
                    turn("D1:3", "Nate", "I also play tennis every week."), turn("D1:4", "Joanna", "Nice."),
                    turn("D1:5", "Nate", "Did I say I have a dog!"), turn("D1:6", "Joanna", "You did."),
                    turn("D1:7", "Nate", "See you."),
                ],
                "session_2_date_time": "10:00 am on 12 June, 2023",
                "session_2": [
                    turn("D2:1", "Nate", "My dog Max loves long walks in the park."),
                    turn("D2:2", "Joanna", "I won a screenwriting contest!"),
                    turn("D2:3", "Nate", "Still playing tennis every week."), turn("D2:4", "Joanna", "Good."),
                ],
            },
            "observation": {
                "session_1_observation": {
                    "Nate": [["Nate has a dog.", "D1:1"], ["Nate plays tennis every week.", "D1:3"], ["Nate has a dog!", "D1:5"]],
                },
                "session_2_observation": {
                    "Nate": [["Nate has a dog named Max who loves long walks in the park.", "D2:1"], ["Nate plays tennis every week.", "D2:3"]],
                    "Joanna": [["Joanna won a screenwriting contest.", "D2:2"], ["Joanna likes tea.", "D9:1"]],
                },
            },
            "qa": [
                {"question": "What is Nate's dog called?", "answer": "Max", "evidence": ["D2:1"], "category": 4},
                {"question": "In which year did Nate get a dog?", "answer": 2023, "evidence": ["D1:1"], "category": 2},
                {"question": "What is Joanna's cat called?", "adversarial_answer": "Max", "evidence": ["D2:1"], "category": 5},
            ],
        },
        {
            "sample_id": "conv-b",
            "conversation": {
                "speaker_a": "Maya", "speaker_b": "Leo",
                "session_1_date_time": "9:00 am on 1 March, 2023",
                "session_1": [turn("D1:1", "Maya", "I moved to Porto."), turn("D1:2", "Leo", "Great!")],
            },
            "observation": {"session_1_observation": {"Maya": [["Maya moved to Porto.", "D1:1"]]}},
            "qa": [{"question": "Where does Maya live?", "answer": "Porto", "evidence": ["D1:1"], "category": 4}],
        },
    ]);
    let path = dir.join("tiny-locomo.json");
    std::fs::write(&path, serde_json::to_string_pretty(&data).unwrap()).unwrap();
    path
}

fn distill(dir: &Path, extra: &[&str]) -> std::process::Output {
    let data = tiny_locomo(dir);
    let out = dir.join("out");
    let mut args = vec!["distill", "locomo", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::memlora_command(dir).args(&args).output().expect("run memlora")
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn assistant_answer(line: &Value) -> &str {
    line["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap()
}

fn user_prompt(line: &Value) -> &str {
    line["messages"].as_array().unwrap().iter().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap()
}

/// The number a memory was shown under in an update prompt.
fn shown_id(prompt: &str, memory: &str) -> String {
    prompt.lines().find_map(|line| line.split_once(": ").filter(|(_, text)| *text == memory).map(|(id, _)| id.to_owned())).unwrap()
}

#[test]
fn distill_writes_training_files_the_trainer_reads_with_labels_from_evidence_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let out = distill(dir.path(), &["--train", "conv-a", "--val", "conv-b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out_dir = dir.path().join("out");
    for op in ["extract", "update", "generate"] {
        for split in ["train", "val"] {
            let path = out_dir.join(format!("{op}.{split}.jsonl"));
            // Every line is a training example for `memlora adapters train`.
            let conversations = read_conversations(&path).unwrap_or_else(|e| panic!("{e}"));
            let records = lines(&path);
            assert_eq!(conversations.len(), records.len());
            let expected = if split == "train" { "conv-a" } else { "conv-b" };
            assert!(records.iter().all(|r| r["conversation"] == expected), "{op}.{split}: split by conversation");
            for messages in &conversations {
                assert_eq!(messages.last().unwrap().role, Role::Assistant);
            }
        }
    }

    // Extraction, per window of two turns: the prompts are the pipeline's, the answers
    // the observations whose evidence ends in the window.
    let extract = lines(&out_dir.join("extract.train.jsonl"));
    let answers: Vec<&str> = extract.iter().map(assistant_answer).collect();
    assert_eq!(
        answers,
        [
            r#"{"facts": ["Nate has a dog."]}"#,
            r#"{"facts": ["Nate plays tennis every week."]}"#,
            r#"{"facts": ["Nate has a dog!"]}"#,
            r#"{"facts": [" "]}"#,
            r#"{"facts": ["Nate has a dog named Max who loves long walks in the park.", "Joanna won a screenwriting contest."]}"#,
            r#"{"facts": ["Nate plays tennis every week."]}"#,
        ],
        "the window of D1:7 has no fact; five windows with facts allow one such window (20 % of six)"
    );
    let conversations = memlora::transcript::load_locomo(&dir.path().join("tiny-locomo.json")).unwrap();
    let pipeline = MemoryPipeline::new(Prompts::builtin(), PipelineSettings::default());
    let conv_a = &conversations[0];
    let rendered: Vec<Vec<ChatMessage>> = conv_a
        .sessions
        .iter()
        .flat_map(|session| session_exchanges(conv_a, session, 2))
        .map(|exchange| pipeline.extract_prompt(&exchange).unwrap().unwrap().messages)
        .collect();
    let trained = read_conversations(&out_dir.join("extract.train.jsonl")).unwrap();
    for messages in &trained {
        let prompt = &messages[..messages.len() - 1];
        assert!(rendered.iter().any(|r| r.as_slice() == prompt), "not a prompt the pipeline renders: {prompt:?}");
    }
    assert!(user_prompt(&extract[0]).starts_with("Date: 8 May 2023\nNate: I have a dog.\nJoanna: Cool!"));

    // Update: one example per fact the model would be asked about, in replay order.
    let update = lines(&out_dir.join("update.train.jsonl"));
    let labels: Vec<&str> = update.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["ADD", "NONE", "UPDATE", "ADD", "ADD"], "{update:#?}");
    let decision = |index: usize| serde_json::from_str::<Value>(assistant_answer(&update[index])).unwrap()["memory"][0].clone();
    assert!(assistant_answer(&update[0]).starts_with(r#"{"memory": [{"id": ""#));
    // A repeat names the memory that says it.
    assert_eq!(decision(1)["id"].as_str().unwrap(), shown_id(user_prompt(&update[1]), "Nate has a dog."));
    // The change replaces the memory it changes, under the number it was shown with.
    let changed = decision(2);
    assert_eq!(changed["id"].as_str().unwrap(), shown_id(user_prompt(&update[2]), "Nate has a dog."));
    assert_eq!(changed["text"], "Nate has a dog named Max who loves long walks in the park.");
    assert_eq!(changed["old_memory"], "Nate has a dog.");
    // A new fact is added under the next free number.
    let shown =
        user_prompt(&update[3]).lines().filter(|line| line.split_once(": ").is_some_and(|(id, _)| id.parse::<usize>().is_ok())).count();
    assert_eq!(decision(3)["id"].as_str().unwrap(), shown.to_string());
    assert_eq!(decision(3)["text"], "Joanna won a screenwriting contest.");
    // The unplaced fact is decided at the end of its session, never extracted.
    assert!(user_prompt(&update[4]).ends_with("New fact: Joanna likes tea."));

    // Generation: categories 1-4 with the recalled memories, the answer as text.
    let generate = lines(&out_dir.join("generate.train.jsonl"));
    assert_eq!(generate.iter().map(assistant_answer).collect::<Vec<_>>(), ["Max", "2023"]);
    let prompt = user_prompt(&generate[0]);
    assert!(prompt.starts_with("Memories:\n- (") && prompt.ends_with("What is Nate's dog called?"), "{prompt}");
    assert!(prompt.contains("(12 June 2023) Nate has a dog named Max who loves long walks in the park."), "{prompt}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("distill.json")).unwrap()).unwrap();
    assert_eq!(report["conversations"], json!({"train": ["conv-a"], "val": ["conv-b"]}));
    assert_eq!(report["counts"]["extract"]["train"], json!({"examples": 6, "available": 6}));
    assert_eq!(report["labels"]["update"]["train"], json!({"ADD": 3, "NONE": 1, "UPDATE": 1}));
    assert_eq!(report["update_labels"], "rules");
    assert_eq!(report["prompts_version"], 1);
    assert_eq!(report["data_sha256"].as_str().unwrap().len(), 64);
    let replay = &report["replay"]["conv-a"];
    assert_eq!(
        (replay["added_without_model"].as_u64(), replay["known_without_model"].as_u64(), replay["unplaced"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(replay["questions_skipped"], 1);
    assert_eq!(report["length_unit"], "characters", "no chat model in this test's cache");

    // Sampling caps every file.
    let capped = distill(dir.path(), &["--train", "conv-a", "--val", "conv-b", "--max-examples-per-op", "1"]);
    assert!(capped.status.success(), "{}", stderr(&capped));
    for op in ["extract", "update", "generate"] {
        assert_eq!(lines(&out_dir.join(format!("{op}.train.jsonl"))).len(), 1);
    }
}

#[test]
fn unknown_or_overlapping_conversations_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_one_line_error(&distill(dir.path(), &["--train", "conv-a,conv-zz"]), &["conv-zz", "tiny-locomo.json"]);
    assert_one_line_error(&distill(dir.path(), &["--val", "conv-99"]), &["conv-99"]);
    assert_one_line_error(&distill(dir.path(), &["--train", "conv-a", "--val", "conv-a"]), &["conv-a", "both"]);
    assert!(!dir.path().join("out").exists());
}

/// A stand-in for an OpenAI-compatible server: answers every request with `content`
/// and keeps the request bodies.
fn fake_teacher(content: &str) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let body =
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut request = vec![0; length];
            reader.read_exact(&mut request).unwrap();
            let mut request: Value = serde_json::from_slice(&request).unwrap();
            request["path"] = json!(request_line.split_whitespace().nth(1).unwrap_or_default());
            seen.lock().unwrap().push(request);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).unwrap();
        }
    });
    (url, requests)
}

#[test]
fn a_teacher_labels_the_update_decisions_and_an_unreachable_one_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // The teacher writes its own JSON style around a NONE of memory 0.
    let (url, requests) = fake_teacher("Sure:\n```json\n{\"memory\":[{\"id\":\"0\",\"text\":\"whatever\",\"event\":\"NONE\"}]}\n```");
    let out = distill(dir.path(), &["--train", "conv-a", "--val", "conv-b", "--teacher", &url, "--teacher-model", "big-teacher"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let update = lines(&dir.path().join("out").join("update.train.jsonl"));
    assert!(!update.is_empty());
    let requests = requests.lock().unwrap();
    // One request per decision the model would be asked for, with the pipeline's prompt.
    assert_eq!(requests.len(), update.len());
    for (request, example) in requests.iter().zip(&update) {
        assert_eq!(request["path"], "/v1/chat/completions");
        assert_eq!(request["model"], "big-teacher");
        let messages = example["messages"].as_array().unwrap();
        assert_eq!(request["messages"].as_array().unwrap().as_slice(), &messages[..messages.len() - 1]);
        assert_eq!(example["label"], "NONE");
        let answer = assistant_answer(example);
        // Rewritten in the prompt's format, the shown memory's text kept.
        let first_memory = user_prompt(example).lines().nth(1).unwrap().split_once(": ").unwrap().1;
        assert_eq!(answer, format!(r#"{{"memory": [{{"id": "0", "text": {}, "event": "NONE"}}]}}"#, json!(first_memory)));
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out").join("distill.json")).unwrap()).unwrap();
    assert_eq!(report["update_labels"], json!({"teacher": format!("{url}/v1/chat/completions"), "model": "big-teacher"}));

    // Nothing listens on port 1.
    let out = distill(dir.path(), &["--train", "conv-a", "--val", "conv-b", "--teacher", "http://127.0.0.1:1", "--teacher-model", "t"]);
    assert_one_line_error(&out, &["teacher http://127.0.0.1:1/v1/chat/completions"]);
}
