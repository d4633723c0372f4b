//! The pipeline's logic with a scripted model stand-in and the store tests' bag-of-words
//! embedder; the real model runs in tests/memory.rs.

use super::*;
use crate::memory::tests::{embed, DIM};
use crate::memory::{Memory, MemoryFilter};

type Script = Box<dyn FnMut(Operation, &RenderedPrompt) -> String>;

/// Answers each prompt with what the script returns, and records the prompts.
struct ScriptedModel {
    script: Script,
    prompts: Vec<(Operation, String)>,
}

impl ScriptedModel {
    fn new(script: impl FnMut(Operation, &RenderedPrompt) -> String + 'static) -> ScriptedModel {
        ScriptedModel { script: Box::new(script), prompts: Vec::new() }
    }

    fn calls(&self, operation: Operation) -> usize {
        self.prompts.iter().filter(|(op, _)| *op == operation).count()
    }
}

impl LanguageModel for ScriptedModel {
    fn complete(
        &mut self,
        operation: Operation,
        prompt: &RenderedPrompt,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, PipelineError> {
        self.prompts.push((operation, prompt.messages.last().map(|m| m.content.clone()).unwrap_or_default()));
        let output = (self.script)(operation, prompt);
        // Streams word by word, as a model would, and honours a stop.
        let mut text = String::new();
        for piece in output.split_inclusive(' ') {
            text.push_str(piece);
            if on_text(piece).is_break() {
                break;
            }
        }
        Ok(Completion { completion_tokens: text.split(' ').count(), text, prompt_tokens: 10, stats: None })
    }
}

struct BagOfWords {
    fail: bool,
}

impl TextEmbedder for BagOfWords {
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, PipelineError> {
        if self.fail {
            return Err(PipelineError::Embedder("scripted failure".into()));
        }
        Ok(texts.iter().map(|text| embed(text)).collect())
    }
}

fn pipeline() -> MemoryPipeline {
    MemoryPipeline::new(Prompts::builtin(), PipelineSettings::default())
}

fn exchange(speaker: &str, text: &str, date: &str) -> Exchange {
    Exchange {
        turns: vec![Turn { id: Some("D1:1".into()), speaker: speaker.into(), text: text.into() }],
        date: Some(date.into()),
        time: Some(1_000),
        conversation: Some("demo".into()),
        session: Some("session_1".into()),
    }
}

/// What the default pipeline remembers of `exchange`, with the bag-of-words embedder.
fn remember(store: &mut MemoryStore, model: &mut ScriptedModel, exchange: &Exchange) -> TurnReport {
    pipeline().remember(exchange, store, model, &mut BagOfWords { fail: false }).unwrap()
}

fn texts(store: &MemoryStore) -> Vec<String> {
    store.list(&MemoryFilter::default()).into_iter().map(|m| m.text).collect()
}

/// The id the update prompt shows for the memory whose text contains `needle`.
fn shown_id(prompt: &RenderedPrompt, needle: &str) -> String {
    let user = &prompt.messages.last().unwrap().content;
    let line = user.lines().find(|line| line.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not shown in {user:?}"));
    line.split(':').next().unwrap().to_owned()
}

fn store() -> (tempfile::TempDir, MemoryStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(dir.path(), DIM).unwrap();
    (dir, store)
}

#[test]
fn facts_of_a_first_exchange_are_added_without_asking_the_update_model() {
    let (_dir, mut store) = store();
    let mut model = ScriptedModel::new(|operation, _| {
        assert_eq!(operation, Operation::Extract);
        r#"Maya lives in Lisbon.", "Maya has a cat named Miso."]}"#.into()
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I live in Lisbon with my cat Miso.", "8 May 2023"));
    assert_eq!(report.facts, ["Maya lives in Lisbon.", "Maya has a cat named Miso."]);
    assert_eq!(
        report.changes.iter().map(|c| (c.kind, c.text.as_str())).collect::<Vec<_>>(),
        [(OpKind::Add, "Maya lives in Lisbon."), (OpKind::Add, "Maya has a cat named Miso.")]
    );
    assert_eq!((model.calls(Operation::Extract), model.calls(Operation::Update)), (1, 0));
    assert_eq!(model.prompts[0].1, "Date: 8 May 2023\nMaya: I live in Lisbon with my cat Miso.");
    let memory: Memory = store.get(1).unwrap();
    assert_eq!(memory.subject.as_deref(), Some("Maya"));
    assert_eq!(memory.event_time.as_deref(), Some("8 May 2023"));
    assert_eq!((memory.created, memory.source.turns.clone()), (1_000, vec!["D1:1".to_string()]));
    assert_eq!(memory.embedding, embed("Maya lives in Lisbon."));
}

/// A store with the memories of the first exchange.
fn with_lisbon_and_cat() -> (tempfile::TempDir, MemoryStore) {
    let (dir, mut store) = store();
    let mut model = ScriptedModel::new(|_, _| r#"Maya lives in Lisbon.", "Maya has a cat named Miso."]}"#.into());
    remember(&mut store, &mut model, &exchange("Maya", "I live in Lisbon with my cat Miso.", "8 May 2023"));
    (dir, store)
}

#[test]
fn update_decisions_map_shown_ids_back_to_memories() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let mut model = ScriptedModel::new(|operation, prompt| match operation {
        Operation::Extract => r#"Maya moved to Porto.", "Maya gave her cat away."]}"#.into(),
        Operation::Update if prompt.messages[1].content.ends_with("Porto.") => {
            let id = shown_id(prompt, "Lisbon");
            format!(r#"{id}", "text": "Maya lives in Porto.", "event": "UPDATE", "old_memory": "Maya lives in Lisbon."}}]}}"#)
        }
        Operation::Update => format!(r#"{}", "event": "DELETE"}}]}}"#, shown_id(prompt, "cat")),
        Operation::Generate => unreachable!(),
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I moved to Porto and gave my cat away.", "9 June 2023"));
    assert_eq!(model.calls(Operation::Update), 2);
    assert!(model.prompts[1].1.starts_with("Old memories:\n0: "), "{}", model.prompts[1].1);
    assert_eq!(
        report.changes.iter().map(|c| (c.id, c.kind, c.text.as_str(), c.old_text.as_deref())).collect::<Vec<_>>(),
        [
            (1, OpKind::Update, "Maya lives in Porto.", Some("Maya lives in Lisbon.")),
            (2, OpKind::Delete, "Maya has a cat named Miso.", None)
        ]
    );
    assert_eq!(texts(&store), ["Maya lives in Porto."]);
    let porto = store.get(1).unwrap();
    assert_eq!((porto.event_time.as_deref(), porto.embedding.clone()), (Some("9 June 2023"), embed("Maya lives in Porto.")));
    // Both decisions were one batch: one undo reverts them together.
    store.undo().unwrap().unwrap();
    assert_eq!(texts(&store), ["Maya lives in Lisbon.", "Maya has a cat named Miso."]);
}

#[test]
fn an_update_that_would_drop_what_a_memory_says_adds_its_text_beside_it() {
    let (_dir, mut store) = with_lisbon_and_cat();
    // A small model's UPDATE of the wrong memory: the cat memory rewritten into the move.
    let mut model = ScriptedModel::new(|operation, prompt| match operation {
        Operation::Extract => r#"Maya moved to York."]}"#.into(),
        _ => format!(r#"{}", "text": "Maya moved to York.", "event": "UPDATE"}}]}}"#, shown_id(prompt, "cat")),
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I moved to York.", "2 May 2023"));
    assert_eq!(report.changes.iter().map(|c| (c.kind, c.text.as_str())).collect::<Vec<_>>(), [(OpKind::Add, "Maya moved to York.")]);
    assert!(report.skipped.iter().any(|s| s.contains("would drop most of \"Maya has a cat named Miso.\"")), "{:?}", report.skipped);
    assert_eq!(texts(&store), ["Maya lives in Lisbon.", "Maya has a cat named Miso.", "Maya moved to York."]);
}

#[test]
fn invalid_decisions_are_skipped_and_valid_ones_applied() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let mut model = ScriptedModel::new(|operation, prompt| match operation {
        Operation::Extract => r#"Maya bought a bike."]}"#.into(),
        _ => {
            let lisbon = shown_id(prompt, "Lisbon");
            format!(
                r#"7", "text": "x", "event": "UPDATE"}}, {{"id": "{lisbon}", "event": "UPDATE"}}, {{"event": "DELETE"}}, {{"id": "9", "event": "ADD"}}, {{"id": "{lisbon}", "event": "DELETE"}}, {{"id": "{lisbon}", "event": "UPDATE", "text": "twice"}}, {{"id": "1", "event": "SHRUG"}}, {{"id": "5", "text": "Maya bought a red bike.", "event": "ADD"}}]}}"#
            )
        }
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I bought a red bike.", "1 July 2023"));
    let skipped = report.skipped.join("\n");
    for reason in [
        "not one of the 2 memories shown",
        "UPDATE without text",
        "Delete without an id",
        "ADD without text",
        "already changed by an earlier decision",
    ] {
        assert!(skipped.to_lowercase().contains(&reason.to_lowercase()), "{reason:?} not in {skipped}");
    }
    assert_eq!(
        report.changes.iter().map(|c| (c.kind, c.text.as_str())).collect::<Vec<_>>(),
        [(OpKind::Delete, "Maya lives in Lisbon."), (OpKind::Add, "Maya bought a red bike.")]
    );
    assert_eq!(texts(&store), ["Maya has a cat named Miso.", "Maya bought a red bike."]);
}

#[test]
fn unusable_output_changes_nothing_when_undecided_facts_are_skipped() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let before = store.list(&MemoryFilter::default());
    let seq = store.seq();
    let pipeline =
        MemoryPipeline::new(Prompts::builtin(), PipelineSettings { undecided_facts: UndecidedFacts::Skip, ..PipelineSettings::default() });
    for (extract, update) in [
        ("I am not sure what you mean.", ""),
        (r#"Maya has a dog."]}"#, "I think the answer is yes"),
        (r#"Maya has a dog."]}"#, r#"0", "event": "UPDATE"}]}"#),
    ] {
        let mut model =
            ScriptedModel::new(move |operation, _| if operation == Operation::Extract { extract.into() } else { update.into() });
        let report = pipeline
            .remember(&exchange("Maya", "I have a dog.", "1 July 2023"), &mut store, &mut model, &mut BagOfWords { fail: false })
            .unwrap();
        assert!(report.changes.is_empty() && !report.skipped.is_empty(), "{extract:?} {update:?}: {report:?}");
    }
    assert_eq!((store.list(&MemoryFilter::default()), store.seq()), (before, seq));
}

#[test]
fn by_default_a_fact_without_a_usable_decision_is_added_not_lost() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let mut model =
        ScriptedModel::new(|operation, _| if operation == Operation::Extract { r#"Maya has a dog."]}"#.into() } else { "no idea".into() });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I have a dog.", "1 July 2023"));
    assert_eq!((report.undecided, report.skipped.len()), (1, 1), "{report:?}");
    assert_eq!(texts(&store), ["Maya lives in Lisbon.", "Maya has a cat named Miso.", "Maya has a dog."]);
}

#[test]
fn a_failing_embedder_applies_nothing() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let seq = store.seq();
    let mut model = ScriptedModel::new(|_, _| r#"Maya has a dog."]}"#.into());
    let error =
        pipeline().remember(&exchange("Maya", "I have a dog.", "1 July 2023"), &mut store, &mut model, &mut BagOfWords { fail: true });
    assert!(matches!(error, Err(PipelineError::Embedder(_))));
    assert_eq!(store.seq(), seq);
}

#[test]
fn known_facts_and_repeats_need_no_model() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let mut model = ScriptedModel::new(|operation, _| match operation {
        Operation::Extract => r#"maya lives in lisbon", "Maya likes tea.", "Maya likes tea."]}"#.into(),
        _ => r#"0", "event": "NONE"}]}"#.into(),
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I live in Lisbon and I like tea.", "2 July 2023"));
    assert_eq!(model.calls(Operation::Update), 1, "only the new fact is decided by the model");
    // The extraction stopped at the repeated fact.
    assert_eq!(report.facts, ["maya lives in lisbon", "Maya likes tea."]);
    assert_eq!(report.unchanged, 2, "{report:?}");
}

#[test]
fn extraction_stops_when_the_json_closes_or_a_fact_repeats() {
    let mut end = JsonEnd::default();
    assert!(!end.feed(r#"{"facts": ["a ] }", "b \" ]"#));
    assert!(end.feed(r#"", "c"]} and more"#));
    let mut repeat = JsonEnd { stop_on_repeat: true, ..JsonEnd::default() };
    assert!(!repeat.feed(r#"{"facts": ["Maya likes tea.", "Tom"#));
    assert!(repeat.feed(r#"", "maya likes tea.""#));
}

#[test]
fn answers_recall_memories_with_their_dates() {
    let (_dir, store) = with_lisbon_and_cat();
    let mut model = ScriptedModel::new(|operation, _| {
        assert_eq!(operation, Operation::Generate);
        "Maya lives in Lisbon.".into()
    });
    let mut streamed = String::new();
    let answer = pipeline()
        .answer("Where does Maya live?", &store, &mut model, &mut BagOfWords { fail: false }, &mut |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((answer.text.as_str(), streamed.as_str()), ("Maya lives in Lisbon.", "Maya lives in Lisbon."));
    assert_eq!(answer.memories[0].text, "Maya lives in Lisbon.");
    assert!(model.prompts[0].1.starts_with("Memories:\n- (8 May 2023) Maya lives in Lisbon.\n"), "{}", model.prompts[0].1);
    assert!(model.prompts[0].1.ends_with("\n\nWhere does Maya live?"));
}

#[test]
fn the_speaker_a_fact_names_is_its_subject() {
    let turn = |speaker: &str| Turn { id: None, speaker: speaker.into(), text: "x".into() };
    let (maya, tom) = (turn("Maya"), turn("Tom"));
    assert_eq!(subject_of("Tom adopted a beagle.", &[&maya, &tom]).as_deref(), Some("Tom"));
    assert_eq!(subject_of("Maya's sister visited Tom.", &[&maya, &tom]).as_deref(), Some("Maya"));
    assert_eq!(subject_of("It rained all week.", &[&maya, &tom]), None);
    assert_eq!(subject_of("It rained all week.", &[&maya]).as_deref(), Some("Maya"));
}

#[test]
fn a_question_asks_no_model_and_stores_nothing() {
    let (_dir, mut store) = with_lisbon_and_cat();
    let seq = store.seq();
    let mut model = ScriptedModel::new(|_, _| r#"Sam adopted a puppy named Rex on 7 May 2023."]}"#.into());
    for text in ["Where does Maya live?", "Thanks, that's great!", "Tell me a joke."] {
        let report = remember(&mut store, &mut model, &exchange("Maya", text, "8 May 2023"));
        assert!(report.facts.is_empty() && report.changes.is_empty(), "{text}: {report:?}");
    }
    assert_eq!(model.prompts.len(), 0);
    assert_eq!(store.seq(), seq);
}

#[test]
fn facts_the_turns_do_not_support_are_skipped_with_their_reason() {
    let (_dir, mut store) = store();
    let mut model = ScriptedModel::new(|operation, _| match operation {
        Operation::Extract => r#"Sam adopted a puppy named Rex on 7 May 2023.", "Maya has a beagle named Biscuit."]}"#.into(),
        _ => unreachable!("nothing related is stored"),
    });
    let report = remember(&mut store, &mut model, &exchange("Maya", "I have a beagle named Biscuit. Do you like dogs?", "8 May 2023"));
    assert_eq!(report.facts, ["Maya has a beagle named Biscuit."]);
    assert_eq!(report.ungrounded, 1);
    assert!(report.skipped.iter().any(|s| s.contains("Rex") && s.contains("not kept")), "{report:?}");
    assert!(texts(&store).iter().all(|text| !text.contains("Rex")));
}

#[test]
fn relative_dates_are_written_out_and_date_the_memory() {
    let (_dir, mut store) = store();
    let mut model = ScriptedModel::new(|_, _| r#"Gina lost her job as a banker yesterday."]}"#.into());
    let report = remember(&mut store, &mut model, &exchange("Gina", "I lost my job as a banker yesterday.", "8 May 2023"));
    assert_eq!(report.facts, ["Gina lost her job as a banker on 7 May 2023."]);
    let memory = store.list(&MemoryFilter::default()).remove(0);
    assert_eq!((memory.text.as_str(), memory.event_time.as_deref()), ("Gina lost her job as a banker on 7 May 2023.", Some("7 May 2023")));
}
