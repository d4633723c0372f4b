//! The worker with tiny random models: requests and their events over channels, ordering,
//! cancellation, broadcast memory changes.

mod common;

use std::collections::BTreeMap;

use candle_core::quantized::GgmlDType;
use common::{write_tiny_bert, TinyModel, TinySpec};
use memlora::assistant::Assistant;
use memlora::engine::{ChatModel, Embedder, LoadOptions, SamplingParams};
use memlora::memory::pipeline::{MemoryPipeline, PipelineSettings};
use memlora::memory::prompts::Prompts;
use memlora::memory::{MemoryStore, OpKind};
use memlora::worker::{self, Event, Request, Submission, WorkerHandle};

fn start(dir: &std::path::Path, max_tokens: usize) -> (WorkerHandle, std::thread::JoinHandle<()>) {
    let model = TinyModel::random(TinySpec::llama(), 31).write_gguf(&dir.join("tiny.gguf"), GgmlDType::Q8_0);
    write_tiny_bert(&dir.join("bert"));
    let chat = ChatModel::load(&model, &LoadOptions::default()).unwrap();
    let embedder = Embedder::load(&dir.join("bert")).unwrap();
    let store = MemoryStore::open(&dir.join("data"), embedder.dimension()).unwrap();
    let pipeline = MemoryPipeline::new(Prompts::builtin(), PipelineSettings::default());
    let sampling = SamplingParams { max_tokens, ..SamplingParams::default() };
    let assistant = Assistant::new(chat, embedder, store, pipeline, BTreeMap::new(), sampling, "User".into()).unwrap();
    worker::spawn(assistant, "tiny".into())
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
    let events = collect(&mut handle.submit(Request::Ask { text: "the cat sat".into(), remember: true }));
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
    let mut submission = handle.submit(Request::Ask { text: "the cat".into(), remember: false });
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
