//! memlora's side of scripts/peft-interop, which compares memlora with the real PEFT
//! library: the logits memlora computes for a model with a PEFT adapter attached, and the
//! ΔW memlora applies for each adapted module.
//!
//!   cargo run --release --example peft_check -- logits MODEL_DIR ADAPTER_DIR 1,2,3
//!       → {"base": [[…], …], "adapted": [[…], …]}   (one row of logits per token)
//!   cargo run --release --example peft_check -- delta ADAPTER_DIR
//!       → {"<PEFT module prefix>": [[…], …], …}      (scale · B·A, out × in)

use std::path::Path;

use anyhow::{bail, Context};
use memlora::adapters::LoraAdapter;
use memlora::engine::{ChatModel, LoadOptions, WeightFormat};
use serde_json::{json, Map, Value};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let output = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["logits", model, adapter, tokens] => logits(Path::new(model), Path::new(adapter), tokens)?,
        ["delta", adapter] => delta(Path::new(adapter))?,
        _ => bail!("usage: peft_check logits MODEL_DIR ADAPTER_DIR TOKENS | peft_check delta ADAPTER_DIR"),
    };
    println!("{output}");
    Ok(())
}

fn logits(model: &Path, adapter: &Path, tokens: &str) -> anyhow::Result<Value> {
    let tokens: Vec<u32> = tokens.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>().context("tokens")?;
    // A model given by path answers to its directory's name, as in the CLI.
    let aliases = model.file_name().map(|name| name.to_string_lossy().into_owned()).into_iter().collect();
    let options = LoadOptions { weights: WeightFormat::Keep, context: 256, aliases, ..LoadOptions::default() };
    let mut model = ChatModel::load(model, &options)?;
    let adapter = LoraAdapter::load(adapter)?;
    model.attach_adapter("peft", &adapter)?;
    let base = model.logits(&tokens, &[])?.to_vec2::<f32>()?;
    let adapted = model.logits(&tokens, &[("peft".to_owned(), 1.0)])?.to_vec2::<f32>()?;
    Ok(json!({"base": base, "adapted": adapted}))
}

fn delta(adapter: &Path) -> anyhow::Result<Value> {
    let adapter = LoraAdapter::load(adapter)?;
    let mut deltas = Map::new();
    for (key, pair) in &adapter.modules {
        let delta = (pair.b.matmul(&pair.a)? * adapter.scale())?;
        deltas.insert(key.peft_prefix(), json!(delta.to_vec2::<f32>()?));
    }
    Ok(Value::Object(deltas))
}
