#!/usr/bin/env python3
"""memlora's adapters against the real PEFT library (run by scripts/peft-interop).

  peft_interop.py check-export DIR [--base-model ID]
      Checks an adapter that `memlora adapters export` wrote, with the `safetensors`
      package only (no torch): PEFT's tensor names, both factors of every module, ranks
      and widths that agree with adapter_config.json, finite float32 values, and the
      base model PEFT will load it onto. The test command runs this.

  peft_interop.py interop WORKDIR MEMLORA PEFT_CHECK
      Both directions with peft, transformers and torch:
      1. PEFT → memlora: a LoRA made by PEFT on a tiny random Llama made by transformers,
         saved, then read by memlora (PEFT_CHECK logits): the same logits as PEFT's.
      2. memlora → PEFT: an adapter trained and exported by memlora (MEMLORA adapters
         train / export) on the same model, loaded by PeftModel.from_pretrained: the same
         ΔW for every module as memlora applies (PEFT_CHECK delta), and the same logits.
"""
import json
import math
import os
import re
import subprocess
import sys

# Float32 on one CPU: both sides run the same arithmetic in a different order.
LOGITS_TOLERANCE = 1e-4
DELTA_TOLERANCE = 1e-6

NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.lora_([AB])\.weight$")


def fail(message):
    print(f"peft-interop: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_export(directory, base_model=None):
    from safetensors.numpy import load_file
    import numpy as np

    config = json.load(open(os.path.join(directory, "adapter_config.json")))
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    if config.get("peft_type") != "LORA":
        fail(f"peft_type is {config.get('peft_type')!r}")
    rank = config["r"]
    if base_model is not None and config.get("base_model_name_or_path") != base_model:
        fail(f"base_model_name_or_path is {config.get('base_model_name_or_path')!r}, not {base_model!r}")
    modules = {}
    for name, tensor in tensors.items():
        match = NAME.match(name)
        if not match:
            fail(f"{name}: not a PEFT LoRA tensor name")
        if tensor.dtype != np.float32 or tensor.ndim != 2 or not np.isfinite(tensor).all():
            fail(f"{name}: {tensor.dtype} of shape {tensor.shape}, or not finite")
        modules.setdefault(match.group(1, 2, 3), {})[match.group(4)] = tensor
    if not modules:
        fail("no tensors")
    targets = set(config["target_modules"])
    for (layer, block, module), pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            fail(f"layer {layer} {module}_proj has only lora_{''.join(pair)}")
        if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            fail(f"layer {layer} {module}_proj: A {pair['A'].shape}, B {pair['B'].shape}, r = {rank}")
        if f"{module}_proj" not in targets:
            fail(f"{module}_proj is adapted but target_modules is {sorted(targets)}")
    print(
        f"peft-interop: {directory}: {len(modules)} modules of rank {rank}, "
        f"{sum(t.size for t in tensors.values())} parameters, base model {config.get('base_model_name_or_path')}: a valid PEFT LoRA"
    )


def tiny_llama(directory):
    """A tiny random Llama saved by transformers, with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words += [f"w{i}" for i in range(config.vocab_size - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return model


def run_json(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"{' '.join(command)}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def max_diff(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        fail(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max())


def interop(work, memlora, peft_check):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    model_dir = os.path.join(work, "tiny-llama")
    base = tiny_llama(model_dir)
    tokens = [5, 9, 17, 33, 2, 64, 127, 1, 40]
    ids = torch.tensor([tokens])

    # 1. PEFT → memlora. PEFT starts B at zero; random B makes the adapter matter.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(tiny_llama(os.path.join(work, "scratch-llama")), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
        expected = peft_model(ids).logits[0].numpy()
        expected_base = base(ids).logits[0].numpy()
    peft_dir = os.path.join(work, "made-by-peft")
    peft_model.save_pretrained(peft_dir)
    ours = run_json([peft_check, "logits", model_dir, peft_dir, ",".join(map(str, tokens))])
    base_diff, adapted_diff = max_diff(ours["base"], expected_base), max_diff(ours["adapted"], expected)
    effect = max_diff(expected, expected_base)
    print(f"peft-interop: PEFT → memlora: max |logit difference| {adapted_diff:.2e} with the adapter ({base_diff:.2e} without; the adapter moves logits by up to {effect:.2e})")
    if not (adapted_diff < LOGITS_TOLERANCE and base_diff < LOGITS_TOLERANCE):
        fail(f"memlora's logits differ from PEFT's by more than {LOGITS_TOLERANCE}")
    if effect < 100 * LOGITS_TOLERANCE:
        fail("the PEFT adapter barely changes the logits, so the comparison says nothing")

    # 2. memlora → PEFT: train on the tiny model, export, load in PEFT.
    data_dir = os.path.join(work, "data")
    examples = os.path.join(work, "examples.jsonl")
    with open(examples, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}", "completion": f"w{i + 3} w{i + 4}"}) + "\n")
    env = dict(os.environ, MEMLORA_DATA_DIR=data_dir, HF_HUB_OFFLINE="1")
    for command in (
        [memlora, "adapters", "train", "--model", model_dir, "--data", examples, "--name", "trained", "--targets", "all-linear",
         "--rank", "4", "--alpha", "8", "--epochs", "2", "--batch", "4", "--lr", "0.01", "--max-tokens", "64"],
        [memlora, "adapters", "export", "trained", os.path.join(work, "made-by-memlora")],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            fail(f"{' '.join(command[1:3])}: {done.stderr.strip()}")
    exported = os.path.join(work, "made-by-memlora")
    check_export(exported)
    loaded = PeftModel.from_pretrained(tiny_llama(os.path.join(work, "scratch-llama-2")), exported).eval()
    ours = run_json([peft_check, "delta", exported])
    worst, count = 0.0, 0
    for name, module in loaded.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            prefix = name.replace(".base_layer", "")
            if prefix not in ours:
                fail(f"PEFT adapts {prefix}, which memlora's export does not have")
            worst = max(worst, max_diff(module.get_delta_weight("default").detach().numpy(), ours[prefix]))
            count += 1
    if count != len(ours):
        fail(f"PEFT loaded {count} modules, memlora exported {len(ours)}")
    with torch.no_grad():
        expected = loaded(ids).logits[0].numpy()
    ours_logits = run_json([peft_check, "logits", model_dir, exported, ",".join(map(str, tokens))])["adapted"]
    logits_diff = max_diff(ours_logits, expected)
    print(f"peft-interop: memlora → PEFT: {count} modules, max |ΔW difference| {worst:.2e}; max |logit difference| {logits_diff:.2e}")
    if not (worst < DELTA_TOLERANCE and logits_diff < LOGITS_TOLERANCE):
        fail("PEFT reads memlora's export differently")
    if math.isclose(max(abs(v) for row in ours.values() for r in row for v in r), 0.0):
        fail("the trained adapter is all zeros, so the comparison says nothing")
    print("peft-interop: OK")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "check-export":
        base = sys.argv[sys.argv.index("--base-model") + 1] if "--base-model" in sys.argv else None
        check_export(sys.argv[2], base)
    elif len(sys.argv) == 5 and sys.argv[1] == "interop":
        interop(*sys.argv[2:])
    else:
        fail(__doc__)
