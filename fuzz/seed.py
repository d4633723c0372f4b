#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/ (stdlib only,
deterministic): well-formed inputs of each kind, so the fuzzer starts from the paths that
matter, plus the malformed-input corpus of tests/corpus/malformed. Inputs the fuzzer
found later are kept beside these; run again after changing a seed.
"""
import glob
import json
import os
import struct

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
MALFORMED = os.path.join(ROOT, "tests", "corpus", "malformed")


def write(target, name, data):
    path = os.path.join(FUZZ, "corpus", target, "seed-" + name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def copy(target, pattern, prefix=""):
    for path in sorted(glob.glob(pattern)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                write(target, prefix + os.path.basename(path), f.read())


# Model output: what the extraction and update prompts get back, clean and damaged.
outputs = {
    "facts.json": '{"facts": ["Caroline adopted a beagle named Biscuit on 7 May 2023.", "Caroline works as a nurse in Leeds."]}',
    "facts-empty.json": '{"facts": []}',
    "facts-fenced.txt": 'Here you go:\n```json\n{"facts": ["Melanie paints."]}\n```\nHope this helps!',
    "facts-truncated.txt": '{"facts": ["Melanie ran a charity race on 20 May 2023", "She',
    "facts-python.txt": "{'facts': ['Jon lost his job', \"Gina's store opened\",],}",
    "facts-repeated-prefill.txt": '{"facts": {"facts": ["a"]}}',
    "ops.json": json.dumps({"memory": [
        {"id": "0", "event": "UPDATE", "text": "Caroline works as a nurse in York.", "old_memory": "Caroline works as a nurse in Leeds."},
        {"id": "new", "event": "ADD", "text": "Caroline has a beagle."},
        {"id": "2", "event": "DELETE", "text": "Caroline dislikes dogs."},
        {"id": "3", "event": "NONE", "text": "Caroline paints."},
    ]}),
    "ops-unquoted-keys.txt": '{memory: [{id: 1, event: add, text: "x"}]}',
    "ops-prose.txt": 'I think {"memory": [] } is the answer [1, 2',
}
for name, text in outputs.items():
    write("model_output", name, text)

# Request lines: every request type of the protocol, and the malformed batch lines.
lines = [
    {"id": 1, "type": "ask", "text": "What is my dog's name?", "stream": True},
    {"id": 2, "type": "ask", "text": "What is in this picture?", "remember": False, "image": "/tmp/cat.png"},
    {"id": 3, "type": "remember", "text": "I adopted a beagle named Biscuit.", "subject": "Caroline"},
    {"id": 4, "type": "search", "query": "dog", "top_k": 5},
    {"id": 5, "type": "forget", "memory_id": 1},
    {"id": 6, "type": "edit", "memory_id": 1, "text": "I have a beagle."},
    {"id": 7, "type": "undo"},
    {"id": 8, "type": "memories"},
    {"id": 9, "type": "status"},
    {"id": 10, "type": "adapters"},
    {"id": 11, "type": "image", "path": "/tmp/cat.png"},
    {"id": 12, "type": "cancel", "target": 1},
    {"id": "x", "type": "ingest", "path": "/tmp/conv.json", "format": "locomo", "conversations": ["conv-26"], "sessions": "1-3", "events": True},
]
write("request_line", "requests.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
write("request_line", "not-json.txt", "ask me anything\n{\"id\": 1,\n[]\n")


# GGUF: a header the engine accepts (llama metadata, one tensor) and the malformed ones.
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv_u32(key, value):
    return gguf_string(key) + struct.pack("<II", 4, value)


def kv_str(key, value):
    return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)


def kv_f32(key, value):
    return gguf_string(key) + struct.pack("<If", 6, value)


metadata = [
    kv_str("general.architecture", "llama"),
    kv_u32("llama.embedding_length", 16),
    kv_u32("llama.attention.head_count", 2),
    kv_u32("llama.attention.head_count_kv", 1),
    kv_u32("llama.feed_forward_length", 32),
    kv_u32("llama.block_count", 1),
    kv_u32("llama.context_length", 64),
    kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
]
# token_embd.weight: f32 (type 0), 16 × 40.
tensor = gguf_string("token_embd.weight") + struct.pack("<IQQ", 2, 16, 40) + struct.pack("<IQ", 0, 0)
header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(metadata)) + b"".join(metadata) + tensor
header += bytes((-len(header)) % 32)
write("gguf_header", "tiny-llama.gguf", header + bytes(16 * 40 * 4))
copy("gguf_header", os.path.join(MALFORMED, "gguf-*"), "malformed-")


# PEFT adapters: 2-byte config length, adapter_config.json, adapter_model.safetensors.
def safetensors(tensors):
    header, data = {}, b""
    for name, (shape, values) in tensors.items():
        raw = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def framed(config, weights):
    config = json.dumps(config).encode()
    return struct.pack("<H", len(config)) + config + weights


prefix = "base_model.model.model.layers.0.self_attn.q_proj"
config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}
weights = safetensors({
    prefix + ".lora_A.weight": ([2, 16], [0.01 * i for i in range(32)]),
    prefix + ".lora_B.weight": ([16, 2], [0.0] * 32),
})
write("peft_adapter", "tiny-q-proj.bin", framed(config, weights))
for path in sorted(glob.glob(os.path.join(MALFORMED, "adapter-*"))):
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        weights = f.read()
    config_path = os.path.join(path, "adapter_config.json")
    config_bytes = open(config_path, "rb").read() if os.path.exists(config_path) else b"{}"
    write("peft_adapter", "malformed-" + os.path.basename(path) + ".bin", struct.pack("<H", len(config_bytes)) + config_bytes + weights)

# Transcripts: the demo conversation in both formats and the malformed ones.
copy("transcript", os.path.join(ROOT, "assets", "demo-*"))
copy("transcript", os.path.join(MALFORMED, "locomo-*"), "malformed-")
copy("transcript", os.path.join(MALFORMED, "transcript-*"), "malformed-")

# TOML (manifests, the config file) and memory exports.
copy("toml_and_import", os.path.join(ROOT, "models", "*.toml"))
copy("toml_and_import", os.path.join(ROOT, "config", "default.toml"))
copy("toml_and_import", os.path.join(ROOT, "assets", "facts-sample.jsonl"))
for kind in ("manifest", "config", "import"):
    copy("toml_and_import", os.path.join(MALFORMED, kind + "-*"), "malformed-")
