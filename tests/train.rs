//! LoRA training and the memorization audit on tiny random models: the training forward
//! computes what the inference engine computes, training learns, an interrupted run
//! resumes to the same adapter, bad input is refused in one line, and canaries trained
//! into an adapter are exposed.

mod common;

use common::{assert_one_line_error, json_of, stderr};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::{max_abs_diff, TinyModel, TinySpec, TinyVocab};
use memlora::adapters::train::{Batch, LoraTensors, TrainModel};
use memlora::adapters::LoraAdapter;
use memlora::engine::{ChatMessage, ChatModel, LoadOptions, Role, SamplingParams, TargetModule, WeightFormat};

fn memlora(data_dir: &Path, args: &[&str]) -> Output {
    common::memlora_command(data_dir).args(args).output().expect("run memlora")
}

fn load(path: &Path) -> ChatModel {
    ChatModel::load(path, &LoadOptions { weights: WeightFormat::Keep, context: 256, ..LoadOptions::default() }).unwrap()
}

fn write_jsonl(path: &Path, pairs: &[(&str, &str)]) -> PathBuf {
    let lines: Vec<String> = pairs.iter().map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

fn tokens() -> Vec<u32> {
    let v = TinyVocab::new();
    vec![v.id("<|im_start|>"), 72, 101, 300 % v.len() as u32, 5, 17, 99, 42, v.id("Ġthe"), 3, 250, 11, 64, 7]
}

#[test]
fn training_forward_equals_inference_logits_with_and_without_lora() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens();
    for (i, spec) in [TinySpec::llama(), TinySpec::qwen2()].into_iter().enumerate() {
        let model = TinyModel::random(spec, 40 + i as u64);
        let paths = [
            model.write_safetensors(&dir.path().join(format!("st{i}"))),
            // llama GGUF: q/k rows permuted for interleaved rotary pairs.
            model.write_gguf(&dir.path().join(format!("m{i}.gguf")), GgmlDType::F32),
        ];
        for path in paths {
            let mut chat = load(&path);
            let train = TrainModel::load(&path, 64).unwrap();
            let expected = chat.logits(&tokens, &[]).unwrap();
            let got = train.logits(&tokens, None).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < 1e-3, "{path:?}: base logits differ by {diff}");

            let adapter = LoraAdapter::random(chat.decoder_config(), 4, 8.0, &TargetModule::ALL, 0.3, 5 + i as u64).unwrap();
            chat.attach_adapter("a", &adapter).unwrap();
            let expected_lora = chat.logits(&tokens, &[("a".into(), 1.0)]).unwrap();
            let got_lora = train.logits(&tokens, Some(&LoraTensors::from_adapter(&adapter))).unwrap();
            let diff = max_abs_diff(&got_lora, &expected_lora);
            assert!(diff < 1e-3, "{path:?}: logits with LoRA differ by {diff}");
            assert!(max_abs_diff(&expected_lora, &expected) > 1e-2, "the adapter changes the logits");

            // The batched loss (padding, prompt masked) is the completion tokens' negative
            // log-likelihood under the engine's logits.
            let lora = LoraTensors::from_adapter(&adapter);
            let examples: [(&[u32], &[u32]); 2] = [(&tokens[..5], &tokens[5..9]), (&tokens[..3], &tokens[3..])];
            let loss = train.loss(&Batch::new(&examples).unwrap(), Some(&lora), None).unwrap().to_scalar::<f32>().unwrap();
            let mut expected_loss = 0.0;
            for (prompt, completion) in examples {
                let sequence = [prompt, completion].concat();
                let logits = chat.logits(&sequence, &[("a".into(), 1.0)]).unwrap();
                let log_probs = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
                for j in prompt.len()..sequence.len() {
                    expected_loss -= log_probs[j - 1][sequence[j] as usize];
                }
            }
            assert!((loss - expected_loss).abs() < 1e-3 * expected_loss.abs(), "{path:?}: loss {loss}, expected {expected_loss}");
        }
    }
}

const TOY: [(&str, &str); 4] =
    [("the cat", "sat on the mat"), ("a dog", "ran in the park"), ("the report", "grew in the quarter"), ("my sister", "lives in Porto")];

/// Mean log-likelihood per token of `answer` after `prompt`.
fn answer_likelihood(chat: &mut ChatModel, prompt: &str, answer: &str, adapters: &[(String, f32)]) -> f32 {
    let messages = [ChatMessage::new(Role::User, prompt), ChatMessage::new(Role::Assistant, answer)];
    let (p, c) = chat.example_tokens(&messages).unwrap();
    let sequence = [p.clone(), c].concat();
    let logits = chat.logits(&sequence, adapters).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
    let total: f32 = (p.len()..sequence.len()).map(|j| log_probs[j - 1][sequence[j] as usize]).sum();
    total / (sequence.len() - p.len()) as f32
}

#[test]
fn training_lowers_the_loss_and_the_adapter_answers_with_the_trained_completions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 50).write_gguf(&d.join("tiny.gguf"), GgmlDType::F32);
    let data = write_jsonl(&d.join("toy.jsonl"), &TOY);
    let args = [
        "adapters",
        "train",
        "--json",
        "--data",
        data.to_str().unwrap(),
        "--name",
        "toy",
        "--op",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--targets",
        "all-linear",
        "--rank",
        "8",
        "--lr",
        "1e-2",
        "--batch",
        "4",
        "--epochs",
        "150",
        "--dropout",
        "0",
        "--seed",
        "3",
    ];
    let report = json_of(d, &args);
    assert_eq!(report["admission"]["placement"], "installed");
    // The tiny random model's tied embeddings give huge logits (the first loss is about
    // 34 nats a token): 150 steps of one batch.
    assert_eq!(report["steps"], 150);
    let (first, last) = (report["first_loss"].as_f64().unwrap(), report["last_loss"].as_f64().unwrap());
    assert!(last < 0.1 && last < first / 100.0, "loss {first} → {last}");

    let adapter_dir = d.join("adapters").join("toy");
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter_dir.join("training.json")).unwrap()).unwrap();
    let losses: Vec<f64> = log["steps"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 150);
    assert_eq!(log["epochs"].as_array().unwrap().len(), 150);
    // Decreasing, give or take Adam's wobbles: every 30-step window ends lower than it began.
    for w in losses.chunks(30) {
        assert!(w[w.len() - 1] < w[0], "{w:?}");
    }
    assert!(log["tokens_per_second"].as_f64().unwrap() > 0.0);
    let shown = json_of(d, &["adapters", "show", "--json", "toy"]);
    assert_eq!(shown["adapter"]["info"]["operation"], "generate");
    assert!(shown["adapter"]["info"]["source"].as_str().unwrap().starts_with("trained on "));
    assert_eq!(shown["adapter"]["base_model"], "tiny");

    let adapter = LoraAdapter::load(&adapter_dir).unwrap();
    let mut chat = load(&model);
    chat.attach_adapter("toy", &adapter).unwrap();
    let with = [("toy".to_string(), 1.0)];
    let greedy = SamplingParams { max_tokens: 40, ..SamplingParams::default() };
    for (prompt, completion) in TOY {
        let messages = [ChatMessage::new(Role::User, prompt)];
        let answer = chat.generate(&messages, &greedy, &with, &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!(answer.text, completion, "greedy answer to '{prompt}' with the adapter");
        let base = chat.generate(&messages, &greedy, &[], &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_ne!(base.text, completion);
        let (before, after) =
            (answer_likelihood(&mut chat, prompt, completion, &[]), answer_likelihood(&mut chat, prompt, completion, &with));
        assert!(after > before + 2.0, "'{prompt}': log-likelihood per token {before} → {after}");
    }

    // An adapter for another base model is refused when attached.
    let other = TinyModel::random(TinySpec::llama(), 51).write_gguf(&d.join("other.gguf"), GgmlDType::F32);
    let err = load(&other).attach_adapter("toy", &adapter).unwrap_err().to_string();
    assert!(err.contains("trained for base model 'tiny'"), "{err}");
    let out = memlora(d, &["ask", "--no-remember", "--model", other.to_str().unwrap(), "--adapter", "toy", "the cat"]);
    assert_one_line_error(&out, &["trained for base model 'tiny'"]);
    // The name is taken now.
    assert_one_line_error(&memlora(d, &args[..]), &["an adapter named 'toy' is already installed"]);
}

/// The adapter's factors, by tensor name.
fn factors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn an_interrupted_run_resumes_to_the_adapter_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::qwen2(), 60).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let data = write_jsonl(
        &d.join("train.jsonl"),
        &[("one", "uno"), ("two", "dos"), ("three", "tres"), ("four", "cuatro"), ("five", "cinco"), ("six", "seis"), ("seven", "siete")],
    );
    let val = write_jsonl(&d.join("val.jsonl"), &[("eight", "ocho"), ("nine", "nueve")]);
    let train = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "adapters",
            "train",
            "--data",
            data.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
            "--name",
            name,
            "--model",
            model.to_str().unwrap(),
            "--batch",
            "2",
            "--accumulate",
            "2",
            "--epochs",
            "4",
            "--lr",
            "5e-3",
            "--dropout",
            "0.1",
            "--targets",
            "q_proj,v_proj,down_proj",
            "--canaries",
            "1",
            "--canary-repeats",
            "2",
        ];
        args.extend_from_slice(extra);
        memlora(d, &args)
    };
    let out = train("whole", &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // 9 examples in batches of 2, two batches a step: 3 steps an epoch. Stop mid-epoch,
    // then at an epoch's end (before its validation), then finish.
    let checkpoint = d.join("adapters").join(".train-parts");
    for stop in ["2", "6"] {
        let resume: &[&str] = if stop == "2" { &[] } else { &["--resume"] };
        let out = train("parts", &[resume, &["--stop-after-steps", stop][..]].concat());
        // The run's summary line, then the error.
        let err = stderr(&out);
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(&format!("interrupted after step {stop} of 12")) && last.contains("--resume"), "{err}");
        assert!(checkpoint.join("state.json").is_file());
        // Installed adapters do not list a checkpoint.
        assert_eq!(json_of(d, &["adapters", "list", "--json"]).as_array().unwrap().len(), 1);
    }
    // A fresh start is refused while the checkpoint exists.
    assert_one_line_error(&train("parts", &[]), &["--resume"]);
    let out = train("parts", &["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!checkpoint.exists(), "the checkpoint is removed once the adapter is installed");

    let (whole, parts) = (factors(&d.join("adapters").join("whole")), factors(&d.join("adapters").join("parts")));
    assert_eq!(whole.len(), 2 * 3 * 2);
    assert_eq!(whole, parts, "resumed training gives the same factors, bit for bit");
    let log = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapters").join(name).join("training.json")).unwrap()).unwrap()
    };
    let (a, b) = (log("whole"), log("parts"));
    let losses = |l: &serde_json::Value| l["steps"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap()).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(a["epochs"], b["epochs"]);
    assert_eq!(a["best_epoch"], b["best_epoch"]);
    assert_eq!((a["resumed"].as_u64(), b["resumed"].as_u64()), (Some(0), Some(2)));
    assert_eq!(a["canaries"], b["canaries"]);
    assert!(a["epochs"][0]["val_loss"].as_f64().is_some());

    assert_one_line_error(&train("never", &["--resume"]), &["no interrupted training of 'never'"]);
}

#[test]
fn bad_training_input_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 70).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let model = model.to_str().unwrap();
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \n").unwrap();
    let good = write_jsonl(&d.join("good.jsonl"), &TOY);
    let good = good.to_str().unwrap();
    let run = |extra: &[&str]| memlora(d, &[&["adapters", "train", "--model", model, "--name", "x"], extra].concat());
    assert_one_line_error(&run(&["--data", bad.to_str().unwrap()]), &["bad.jsonl", "line 2", "not a training example"]);
    assert_one_line_error(&run(&["--data", good, "--rank", "0"]), &["--rank must be at least 1"]);
    assert_one_line_error(&run(&["--data", good, "--targets", "q_proj,lm_head"]), &["unknown target module 'lm_head'"]);
    assert_one_line_error(&run(&["--data", good, "--dropout", "1"]), &["--dropout 1 is outside [0, 1)"]);
    assert_one_line_error(&run(&["--data", good, "--max-tokens", "8"]), &["good.jsonl", "no example fits --max-tokens 8", "4 are longer"]);
    assert_one_line_error(&run(&["--data", d.join("missing.jsonl").to_str().unwrap()]), &["missing.jsonl"]);
    // clap's usage error for a missing argument.
    let out = run(&[]);
    assert!(!out.status.success() && stderr(&out).contains("--data"), "{}", stderr(&out));
    assert!(!d.join("adapters").join("x").exists(), "nothing was installed");
}

#[test]
fn canaries_trained_into_an_adapter_are_exposed_and_not_under_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 80).write_gguf(&d.join("tiny.gguf"), GgmlDType::F32);
    let data = write_jsonl(&d.join("toy.jsonl"), &TOY[..2]);
    let out = memlora(
        d,
        &[
            "adapters",
            "train",
            "--data",
            data.to_str().unwrap(),
            "--name",
            "leaky",
            "--model",
            model.to_str().unwrap(),
            "--targets",
            "all-linear",
            "--lr",
            "1e-2",
            "--batch",
            "10",
            "--epochs",
            "40",
            "--dropout",
            "0",
            "--canaries",
            "2",
            "--canary-digits",
            "3",
            "--canary-repeats",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapters").join("leaky").join("training.json")).unwrap()).unwrap();
    assert_eq!(log["canaries"]["items"].as_array().unwrap().len(), 2);
    assert_eq!(log["examples"], 10);

    let report = json_of(d, &["adapters", "audit", "leaky", "--json"]);
    assert_eq!(report["exhaustive"], true);
    let canaries = report["canaries"].as_array().unwrap();
    assert_eq!(canaries.len(), 2);
    for c in canaries {
        assert_eq!(c["candidates"], 1000);
        assert_eq!(c["secret"].as_str().unwrap().len(), 3);
    }
    let (base, adapter) = (report["mean_base_exposure"].as_f64().unwrap(), report["mean_adapter_exposure"].as_f64().unwrap());
    assert!(adapter > base + 3.0 && adapter > 7.0, "exposure: base {base}, adapter {adapter}");
    let table = String::from_utf8(memlora(d, &["adapters", "audit", "leaky"]).stdout).unwrap();
    assert!(table.contains("every possible secret") && table.lines().any(|l| l.starts_with("mean")), "{table}");

    // An adapter trained without canaries has nothing to audit.
    assert!(memlora(
        d,
        &["adapters", "train", "--data", data.to_str().unwrap(), "--name", "plain", "--model", model.to_str().unwrap(), "--epochs", "1"]
    )
    .status
    .success());
    assert_one_line_error(&memlora(d, &["adapters", "audit", "plain"]), &["no canaries were planted"]);
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resume_continues() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 90).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let data = write_jsonl(&d.join("toy.jsonl"), &TOY);
    let args =
        ["adapters", "train", "--data", data.to_str().unwrap(), "--name", "long", "--model", model.to_str().unwrap(), "--batch", "1"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlora"))
        .arg("--data-dir")
        .arg(d)
        .args(args)
        .args(["--epochs", "100000"])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("training 'long' on 4 examples"), "{first}");
    // Training has begun; let it take a few steps.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(!status.success());
    let last = rest.last().cloned().unwrap_or_default();
    assert!(last.contains("training interrupted after step") && last.contains("--resume"), "{rest:?}");
    let step: usize = last.split("after step ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(step >= 1);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapters").join(".train-long").join("state.json")).unwrap()).unwrap();
    assert_eq!(state["progress"]["step"], step);

    // Resumed, it continues from that step.
    let stop = (step + 3).to_string();
    let out = memlora(d, &[&args[..], &["--epochs", "100000", "--resume", "--stop-after-steps", &stop]].concat());
    let err = stderr(&out);
    assert!(err.contains(&format!("resuming after step {step}")), "{err}");
    assert!(err.lines().last().unwrap().contains(&format!("interrupted after step {stop} of 400000")), "{err}");
}

#[test]
fn early_stopping_keeps_the_adapter_of_the_best_validation_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 95).write_gguf(&d.join("tiny.gguf"), GgmlDType::F32);
    let data = write_jsonl(&d.join("train.jsonl"), &TOY);
    // The same questions with other answers: the better training fits, the worse validation gets.
    let contrary: Vec<(&str, &str)> = TOY.iter().map(|(p, _)| (*p, "no idea at all")).collect();
    let val = write_jsonl(&d.join("val.jsonl"), &contrary);
    let report = json_of(
        d,
        &[
            "adapters",
            "train",
            "--json",
            "--data",
            data.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
            "--name",
            "early",
            "--model",
            model.to_str().unwrap(),
            "--targets",
            "all-linear",
            "--lr",
            "1e-2",
            "--epochs",
            "20",
            "--dropout",
            "0",
        ],
    );
    let epochs = report["epochs"].as_array().unwrap();
    let val_losses: Vec<f64> = epochs.iter().map(|e| e["val_loss"].as_f64().unwrap()).collect();
    assert_eq!(report["stopped_early"], true, "{val_losses:?}");
    let best = report["best_epoch"].as_u64().unwrap() as usize;
    assert_eq!(epochs.len(), best + 2, "two evaluations without improvement stop the run: {val_losses:?}");
    assert!(val_losses[best - 1] < val_losses[best] && val_losses[best - 1] < val_losses[best + 1], "{val_losses:?}");

    // The installed adapter is the best epoch's: its validation loss, computed by the engine.
    let mut chat = load(&model);
    chat.attach_adapter("early", &LoraAdapter::load(&d.join("adapters").join("early")).unwrap()).unwrap();
    let (mut total, mut count) = (0f64, 0usize);
    for (prompt, answer) in &contrary {
        let messages = [ChatMessage::new(Role::User, *prompt), ChatMessage::new(Role::Assistant, *answer)];
        let (p, c) = chat.example_tokens(&messages).unwrap();
        let sequence = [p.clone(), c].concat();
        let logits = chat.logits(&sequence, &[("early".into(), 1.0)]).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
        for j in p.len()..sequence.len() {
            total -= f64::from(log_probs[j - 1][sequence[j] as usize]);
            count += 1;
        }
    }
    let engine_loss = total / count as f64;
    assert!((engine_loss - val_losses[best - 1]).abs() < 1e-3 * engine_loss, "{engine_loss} vs {val_losses:?}");
}
