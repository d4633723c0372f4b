//! The worker with tiny random models: requests and their events over channels, ordering,
//! cancellation, broadcast memory changes.

mod common;

use std::collections::BTreeMap;

use candle_core::quantized::GgmlDType;
use common::{write_tiny_bert, TinyModel, TinySpec};
use memlora::adapters::merge::MergeMethod;
use memlora::adapters::{AdapterInfo, AdapterRegistry, Admission, Budget, LoraAdapter, MergeSpec, MergeStage};
use memlora::assistant::Assistant;
use memlora::engine::TargetModule;
use memlora::engine::{ChatModel, Embedder, LoadOptions, SamplingParams};
use memlora::memory::pipeline::Operation;
use memlora::memory::pipeline::{MemoryPipeline, PipelineSettings};
use memlora::memory::prompts::Prompts;
use memlora::memory::{MemoryStore, OpKind};
use memlora::worker::{self, AdapterStorage, Event, Request, Submission, WorkerHandle};

fn start(dir: &std::path::Path, max_tokens: usize) -> (WorkerHandle, std::thread::JoinHandle<()>) {
    start_with(dir, max_tokens, 0, &[])
}

fn tiny_model(dir: &std::path::Path) -> std::path::PathBuf {
    TinyModel::random(TinySpec::llama(), 31).write_gguf(&dir.join("tiny.gguf"), GgmlDType::Q8_0)
}

/// A worker on a tiny model whose generation runs with the installed adapters `generate`,
/// and whose adapter storage holds at most `max_slots` adapters (0: no limit).
fn start_with(
    dir: &std::path::Path,
    max_tokens: usize,
    max_slots: usize,
    generate: &[&str],
) -> (WorkerHandle, std::thread::JoinHandle<()>) {
    let model = tiny_model(dir);
    write_tiny_bert(&dir.join("bert"));
    let mut chat = ChatModel::load(&model, &LoadOptions::default()).unwrap();
    let registry = AdapterRegistry::open(&dir.join("data")).unwrap();
    for name in generate {
        chat.attach_adapter(name, &LoraAdapter::load(&registry.path_of(name)).unwrap()).unwrap();
    }
    let embedder = Embedder::load(&dir.join("bert")).unwrap();
    let store = MemoryStore::open(&dir.join("data"), embedder.dimension()).unwrap();
    let pipeline = MemoryPipeline::new(Prompts::builtin(), PipelineSettings::default());
    let sampling = SamplingParams { max_tokens, ..SamplingParams::default() };
    let adapters = BTreeMap::from([(Operation::Generate, generate.iter().map(|name| (name.to_string(), 1.0)).collect())]);
    let assistant = Assistant::new(chat, embedder, store, pipeline, adapters, sampling, "User".into()).unwrap();
    let budget = Budget { max_slots, threshold: None, rank: 8 };
    worker::spawn(assistant, "tiny".into(), AdapterStorage { registry, budget })
}

/// Installs random adapters for the tiny model into `dir`'s data dir.
fn install_adapters(dir: &std::path::Path, names: &[(&str, u64)]) {
    let model = tiny_model(dir);
    let config = ChatModel::load(&model, &LoadOptions::default()).unwrap().decoder_config().clone();
    let registry = AdapterRegistry::open(&dir.join("data")).unwrap();
    for (name, seed) in names {
        let adapter = LoraAdapter::random(&config, 4, 8.0, &[TargetModule::Q, TargetModule::V], 2.0, *seed).unwrap();
        registry.install(name, &adapter, &AdapterInfo::default()).unwrap();
    }
}

/// Installs adapters big enough that merging them takes a while (seconds, not the
/// microseconds a status request takes).
fn install_big_adapters(dir: &std::path::Path, names: &[&str]) {
    let model = tiny_model(dir);
    let mut config = ChatModel::load(&model, &LoadOptions::default()).unwrap().decoder_config().clone();
    (config.hidden_size, config.intermediate_size, config.num_layers) = (1024, 2048, 4);
    let registry = AdapterRegistry::open(&dir.join("data")).unwrap();
    for (seed, name) in names.iter().enumerate() {
        let adapter = LoraAdapter::random(&config, 8, 16.0, &TargetModule::ALL, 0.5, seed as u64).unwrap();
        registry.install(name, &adapter, &AdapterInfo::default()).unwrap();
    }
}

fn merge_spec(adapters: &[&str], into: &str, method: MergeMethod) -> Request {
    Request::MergeAdapters(MergeSpec {
        adapters: adapters.iter().map(|a| a.to_string()).collect(),
        into: into.into(),
        method,
        rank: 8,
        operation: Some("generate".into()),
    })
}

fn answer_text(handle: &WorkerHandle) -> String {
    let events = collect(&mut handle.submit(Request::Ask { text: "the cat sat".into(), remember: false, image: None }));
    events.iter().find_map(|e| if let Event::Answer { text, .. } = e { Some(text.clone()) } else { None }).unwrap()
}

fn collect(submission: &mut Submission) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = submission.events.blocking_recv() {
        let done = event == Event::Done;
        events.push(event);
        if done {
            break;
        }
    }
    events
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .map(|event| match event {
            Event::Token { .. } => "token",
            Event::Answer { .. } => "answer",
            Event::Remembered { .. } => "remembered",
            Event::Changed { .. } => "changed",
            Event::Memories { .. } => "memories",
            Event::Hits { .. } => "hits",
            Event::Progress { .. } => "progress",
            Event::Adapters { .. } => "adapters",
            Event::MergeProgress { .. } => "merge_progress",
            Event::Merged { .. } => "merged",
            Event::Status { .. } => "status",
            Event::Error { .. } => "error",
            Event::Done => "done",
        })
        .collect()
}

#[test]
fn an_ask_streams_tokens_then_answers_then_remembers_then_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _thread) = start(dir.path(), 8);
    let events = collect(&mut handle.submit(Request::Ask { text: "the cat sat".into(), remember: true, image: None }));
    let kinds = kinds(&events);
    let first_non_token = kinds.iter().position(|k| *k != "token").unwrap();
    assert!(first_non_token > 0, "{kinds:?}");
    assert_eq!(&kinds[first_non_token..], ["answer", "remembered", "done"], "{kinds:?}");
    let streamed: String = events.iter().filter_map(|e| if let Event::Token { text } = e { Some(text.as_str()) } else { None }).collect();
    let Event::Answer { text, completion_tokens, cancelled, .. } = &events[first_non_token] else { panic!() };
    assert_eq!((text.as_str(), *completion_tokens, *cancelled), (streamed.as_str(), 8, false));
}

#[test]
fn requests_are_served_in_order_each_on_its_own_channel() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _thread) = start(dir.path(), 4);
    let mut first = handle.submit(Request::Remember { text: "the cat sat on the mat".into(), subject: None });
    let mut second = handle.submit(Request::Memories);
    let mut third = handle.submit(Request::Forget { memory_id: 99 });
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Receive from all three at once, preferring the earliest: the worker sends the next
    // request's events only after the previous one's Done.
    let order = runtime.block_on(async {
        let mut order = Vec::new();
        let mut open = [true; 3];
        while open.iter().any(|o| *o) {
            let (which, event) = tokio::select! {
                biased;
                Some(e) = first.events.recv(), if open[0] => (0, e),
                Some(e) = second.events.recv(), if open[1] => (1, e),
                Some(e) = third.events.recv(), if open[2] => (2, e),
            };
            if event == Event::Done {
                open[which] = false;
            }
            order.push((which, event));
        }
        order
    });
    let sequence: Vec<usize> = order.iter().map(|(which, _)| *which).collect();
    assert!(sequence.windows(2).all(|pair| pair[0] <= pair[1]), "{sequence:?}");
    let Some((_, Event::Memories { memories })) = order.iter().find(|(which, _)| *which == 1) else { panic!("{order:?}") };
    assert_eq!(memories.len(), 1, "the second request sees the first one's memory");
    assert!(order
        .iter()
        .any(|(which, e)| *which == 2 && matches!(e, Event::Error { message } if message.contains("no memory with id 99"))));
}

#[test]
fn cancelling_stops_an_answer_at_the_next_token() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _thread) = start(dir.path(), 200);
    let mut submission = handle.submit(Request::Ask { text: "the cat".into(), remember: false, image: None });
    let mut tokens = 0;
    let answer = loop {
        match submission.events.blocking_recv().unwrap() {
            Event::Token { .. } => {
                tokens += 1;
                if tokens == 3 {
                    submission.cancel.cancel();
                }
            }
            Event::Answer { completion_tokens, cancelled, .. } => break (completion_tokens, cancelled),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(answer.1, "the answer says it was cancelled");
    assert!(answer.0 < 200 && answer.0 >= 3, "{answer:?}");
    assert_eq!(submission.events.blocking_recv(), Some(Event::Done));
    // The worker serves the next request as usual.
    assert_eq!(kinds(&collect(&mut handle.submit(Request::Status))), ["status", "done"]);
}

#[test]
fn memory_changes_reach_every_subscriber_and_a_vanished_requester_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _thread) = start(dir.path(), 4);
    let mut notices = handle.subscribe();
    // A front end that submits and goes away: the change is still made.
    drop(handle.submit(Request::Remember { text: "a dog".into(), subject: Some("Tom".into()) }));
    let events = collect(&mut handle.submit(Request::Forget { memory_id: 1 }));
    assert_eq!(kinds(&events), ["changed", "done"]);
    let added = notices.blocking_recv().unwrap();
    assert_eq!((added.changes[0].kind, added.changes[0].text.as_str(), added.memories), (OpKind::Add, "a dog", 1));
    let deleted = notices.blocking_recv().unwrap();
    assert_eq!((deleted.changes[0].kind, deleted.changes[0].text.as_str(), deleted.memories), (OpKind::Delete, "a dog", 0));
    let undone = collect(&mut handle.submit(Request::Undo));
    let Event::Changed { changes } = &undone[0] else { panic!("{undone:?}") };
    assert_eq!((changes[0].kind, changes[0].text.as_str()), (OpKind::Restore, "a dog"));
}

#[test]
fn dropping_every_handle_stops_the_worker_after_its_current_request() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, thread) = start(dir.path(), 4);
    let submission = handle.submit(Request::Remember { text: "the mat".into(), subject: None });
    drop(handle);
    thread.join().unwrap();
    drop(submission);
    // The remembered memory is durable: the store reopens with it.
    let store = MemoryStore::open(&dir.path().join("data"), 32).unwrap();
    assert_eq!(store.len(), 1);
}

#[test]
fn a_merge_job_reports_each_module_and_installs_the_result() {
    let dir = tempfile::tempdir().unwrap();
    install_adapters(dir.path(), &[("a", 1), ("b", 2)]);
    let (handle, _thread) = start(dir.path(), 4);
    let events = collect(&mut handle.submit(merge_spec(&["a", "b=0.5"], "ab", MergeMethod::Ties { density: 0.5 })));
    let progress: Vec<_> =
        events.iter().filter_map(|e| if let Event::MergeProgress { progress } = e { Some(*progress) } else { None }).collect();
    let modules: Vec<(usize, usize)> = progress.iter().filter(|p| p.stage == MergeStage::Merging).map(|p| (p.done, p.total)).collect();
    // The tiny llama has 2 layers; q and v in each.
    assert_eq!(modules, [(1, 4), (2, 4), (3, 4), (4, 4)], "{progress:?}");
    assert_eq!(progress.first().map(|p| p.stage), Some(MergeStage::Loading));
    assert_eq!(progress.last().map(|p| (p.stage, p.done)), Some((MergeStage::Installing, 1)));
    let Some(Event::Merged { outcome }) = events.iter().find(|e| matches!(e, Event::Merged { .. })) else { panic!("{events:?}") };
    let Admission::Installed { adapter } = &outcome.admission else { panic!("{outcome:?}") };
    assert_eq!((adapter.name.as_str(), adapter.rank), ("ab", 8));
    assert_eq!(adapter.info.merged_from, ["a", "b"]);
    assert!(outcome.recipe.starts_with("ties density=0.5"), "{}", outcome.recipe);
    assert_eq!(events.last(), Some(&Event::Done));
    let registry = AdapterRegistry::open(&dir.path().join("data")).unwrap();
    LoraAdapter::load(&registry.path_of("ab")).unwrap();

    // A bad merge is an error event, and installs nothing.
    let events = collect(&mut handle.submit(merge_spec(&["a", "missing"], "bad", MergeMethod::Linear)));
    assert!(events.iter().any(|e| matches!(e, Event::Error { message } if message.contains("no adapter named 'missing'"))), "{events:?}");
    let events = collect(&mut handle.submit(merge_spec(&["a"], "ab", MergeMethod::Linear)));
    assert!(events.iter().any(|e| matches!(e, Event::Error { message } if message.contains("'ab' is already installed"))), "{events:?}");
    assert!(!registry.path_of("bad").exists());
}

#[test]
fn chat_goes_on_while_a_merge_runs_and_a_cancelled_merge_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    install_big_adapters(dir.path(), &["big1", "big2"]);
    let (handle, _thread) = start(dir.path(), 4);
    let mut merge = handle.submit(merge_spec(&["big1", "big2"], "merged", MergeMethod::Ties { density: 0.2 }));
    // Wait until the merge is fitting modules, then ask for something else.
    loop {
        match merge.events.blocking_recv().unwrap() {
            Event::MergeProgress { progress } if progress.stage == MergeStage::Merging => break,
            Event::MergeProgress { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let status = collect(&mut handle.submit(Request::Status));
    assert_eq!(kinds(&status), ["status", "done"]);
    let mut merge_events = Vec::new();
    while let Ok(event) = merge.events.try_recv() {
        merge_events.push(event);
    }
    assert!(!merge_events.contains(&Event::Done), "the status request waited for the merge: {merge_events:?}");

    merge.cancel.cancel();
    let rest = collect(&mut merge);
    assert!(rest.iter().any(|e| matches!(e, Event::Error { message } if message == "the merge was cancelled")), "{rest:?}");
    assert!(!rest.iter().any(|e| matches!(e, Event::Merged { .. })));
    let registry = AdapterRegistry::open(&dir.path().join("data")).unwrap();
    assert_eq!(registry.list().unwrap().len(), 2);
}

#[test]
fn a_merge_into_a_bound_adapter_is_attached_before_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    install_adapters(dir.path(), &[("style", 5), ("tone", 6)]);
    // A budget of two slots is full already ("style" is bound to generation) …
    let registry = AdapterRegistry::open(&dir.path().join("data")).unwrap();
    let (handle, _thread) = start_with(dir.path(), 6, 2, &["style"]);
    let before = answer_text(&handle);
    // … so a stronger "style" goes into the most similar slot: "style", the adapter in use,
    // becomes the running average of the two, 2·style.
    let events = collect(&mut handle.submit(merge_spec(&["style=3"], "strong-style", MergeMethod::Linear)));
    let Some(Event::Merged { outcome }) = events.iter().find(|e| matches!(e, Event::Merged { .. })) else { panic!("{events:?}") };
    assert!(matches!(&outcome.admission, Admission::Merged { into, .. } if into == "style"), "{outcome:?}");
    let after = answer_text(&handle);

    // What a fresh start on the merged "style" answers.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_registry = AdapterRegistry::open(&fresh.path().join("data")).unwrap();
    fresh_registry.install("style", &LoraAdapter::load(&registry.path_of("style")).unwrap(), &AdapterInfo::default()).unwrap();
    let (fresh_handle, _fresh_thread) = start_with(fresh.path(), 6, 1, &["style"]);
    let expected = answer_text(&fresh_handle);
    assert_ne!(before, expected, "the merge must change the answer for this test to mean anything");
    assert_eq!(after, expected);
}

#[test]
fn a_request_names_its_kind_as_the_protocol_spells_its_type() {
    let lines = [
        serde_json::json!({"type": "ask", "text": "hi"}),
        serde_json::json!({"type": "remember", "text": "hi"}),
        serde_json::json!({"type": "search", "query": "hi"}),
        serde_json::json!({"type": "forget", "memory_id": 1}),
        serde_json::json!({"type": "edit", "memory_id": 1, "text": "hi"}),
        serde_json::json!({"type": "undo"}),
        serde_json::json!({"type": "memories"}),
        serde_json::json!({"type": "ingest", "path": "talk.txt"}),
        serde_json::json!({"type": "adapters"}),
        serde_json::json!({"type": "merge_adapters", "adapters": ["a"], "into": "b"}),
        serde_json::json!({"type": "status"}),
    ];
    for line in lines {
        let request: Request = serde_json::from_value(line.clone()).unwrap();
        assert_eq!(line["type"], request.kind(), "{line}");
        assert_eq!(serde_json::to_value(&request).unwrap()["type"], request.kind());
    }
}
