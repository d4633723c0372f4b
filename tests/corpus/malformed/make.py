#!/usr/bin/env python3
"""Writes the malformed-input corpus beside this script (stdlib only, deterministic).

Each file is a bad input of one kind; `cases.tsv` says which command reads it and
what its one-line error must name. `tests/malformed.rs` runs every case through the
real binary. Run again after changing a case: `python3 tests/corpus/malformed/make.py`.
"""
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def write(name, data):
    path = os.path.join(HERE, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# GGUF: magic, version, tensor count, metadata count, then key/value pairs.
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(version=3, tensors=0, kvs=(), kv_count=None):
    body = b"".join(gguf_string(k) + struct.pack("<I", 8) + gguf_string(v) for k, v in kvs)
    count = len(kvs) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", version, tensors, count) + body


write("gguf-empty.gguf", b"")
write("gguf-wrong-magic.gguf", b"GGUX" + bytes(60))
write("gguf-version-99.gguf", gguf(version=99))
write("gguf-truncated-header.gguf", b"GGUF" + struct.pack("<I", 3) + b"\x01\x00")
write("gguf-absurd-tensor-count.gguf", gguf(tensors=1 << 62))
write("gguf-absurd-metadata-count.gguf", gguf(kv_count=1 << 62))
write("gguf-absurd-key-length.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60) + b"general")
write("gguf-unknown-value-type.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("general.name") + struct.pack("<I", 99))
write("gguf-absurd-array-length.gguf",
      b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 60))
def aligned(data):
    return data + bytes(-len(data) % 32)


write("gguf-no-architecture.gguf", aligned(gguf(kvs=[("general.name", "nothing")])))
write("gguf-unknown-architecture.gguf", aligned(gguf(kvs=[("general.architecture", "mamba9")])))
write("gguf-text.gguf", "This is a note, not a model.\n")


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, rows=b""):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


small = png(4, 4, b"".join(b"\x00" + bytes(12) for _ in range(4)))
write("png-100000x100000.png", png(100000, 100000, b"\x00" * 64))
write("png-truncated.png", small[: len(small) // 2])
broken_crc = bytearray(small)
broken_crc[29] ^= 0xFF  # inside IHDR's CRC
write("png-bad-crc.png", bytes(broken_crc))
write("png-zero-width.png", png(0, 4))
# GIF89a: a 65535 × 65535 logical screen and first frame, a single-pixel LZW stream.
write("gif-65535x65535.gif", b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
      + b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b")
write("webp-garbage.webp", b"RIFF" + struct.pack("<I", 20) + b"WEBPVP8 " + struct.pack("<I", 8) + b"\xff" * 8)
write("jpeg-truncated.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
# BMP: 100000 × 100000 at 24 bits, no pixel data.
write("bmp-100000x100000.bmp", b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
      + struct.pack("<IiiHHIIiiII", 40, 100000, 100000, 1, 24, 0, 0, 2835, 2835, 0, 0))
write("text-named.png", "not a picture\n")

# LoCoMo transcripts.
def locomo(conversation):
    return json.dumps([{"sample_id": "bad-1", "conversation": conversation}])


write("locomo-not-json.json", "[{\"sample_id\": \"x\", \n")
write("locomo-object.json", json.dumps({"sample_id": "x"}))
write("locomo-no-conversation.json", json.dumps([{"sample_id": "x"}]))
write("locomo-session-not-a-list.json", locomo({"speaker_a": "A", "speaker_b": "B", "session_1": "hello", "session_1_date_time": "1:00 pm on 8 May, 2023"}))
write("locomo-turn-without-text.json", locomo({"speaker_a": "A", "speaker_b": "B", "session_1": [{"speaker": "A", "dia_id": "D1:1"}],
                                               "session_1_date_time": "1:00 pm on 8 May, 2023"}))
write("locomo-text-not-a-string.json", locomo({"speaker_a": "A", "speaker_b": "B", "session_1": [{"speaker": "A", "dia_id": "D1:1", "text": 42}],
                                              "session_1_date_time": "1:00 pm on 8 May, 2023"}))
write("locomo-invalid-utf8.json", b"[{\"sample_id\": \"\xff\xfe\"}]")
write("locomo-deep-nesting.json", "[" * 100000 + "]" * 100000)
write("locomo-bom-then-garbage.json", b"\xef\xbb\xbf\x00\x01garbage")

write("transcript-invalid-utf8.txt", b"Alice: hello\nBob: \xff\xfe\xfd\n")
write("transcript-no-speakers.txt", "just some words\nwith no speaker before a colon\n")
write("transcript-empty.txt", "")

write("import-not-json.jsonl", "this is not a memory export\n")
write("import-wrong-fields.jsonl", json.dumps({"memo": "no text field"}) + "\n")
write("import-invalid-utf8.jsonl", b"{\"text\": \"\xff\xfe\"}\n")
write("import-bad-third-line.jsonl", json.dumps({"text": "My sister lives in Porto."}) + "\n"
      + json.dumps({"text": "I play the cello."}) + "\n" + "{\"text\": 3}\n")

write("config-not-toml.toml", "[engine\nthreads = 2\n")
write("config-wrong-type.toml", "[engine]\nthreads = \"many\"\n")
write("config-unknown-key.toml", "[engine]\nturbo = true\n")
write("config-invalid-utf8.toml", b"[engine]\nweights = \"\xff\"\n")
write("config-duplicate-key.toml", "[engine]\nthreads = 1\nthreads = 2\n")

write("manifest-not-toml.toml", "name = \"broken\n")
write("manifest-missing-fields.toml", "name = \"half-a-model\"\n")
write("manifest-bad-sha256.toml", "name = \"bad-sha\"\ndescription = \"x\"\nkind = \"chat\"\narchitecture = \"llama\"\nformat = \"gguf\"\n"
      "license = \"MIT\"\n[[files]]\nname = \"m.gguf\"\nsha256 = \"xyz\"\nsize = 10\nrole = \"weights\"\n"
      "[[sources]]\nhub = \"someone/bad-sha\"\n")


# PEFT adapters for the tiny test model (hidden 64, 2 layers): a directory each.
def safetensors(tensors, header_override=None):
    header, blobs, offset = {}, b"", 0
    for name, (shape, values) in tensors.items():
        data = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs += data
        offset += len(data)
    text = json.dumps(header).encode() if header_override is None else header_override
    return struct.pack("<Q", len(text)) + text + blobs


def config(r=4, **extra):
    c = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}
    c.update(extra)
    return json.dumps(c)


def lora_tensors(r=4, a_value=0.01, a_shape=None, b_shape=None):
    out = {}
    for layer in range(2):
        prefix = "base_model.model.model.layers.%d.self_attn.q_proj" % layer
        a_shape_l = a_shape or [r, 64]
        b_shape_l = b_shape or [64, r]
        out[prefix + ".lora_A.weight"] = (a_shape_l, [a_value] * (a_shape_l[0] * a_shape_l[1]))
        out[prefix + ".lora_B.weight"] = (b_shape_l, [0.01] * (b_shape_l[0] * b_shape_l[1]))
    return out


def adapter(name, config_text, tensor_bytes):
    write(name + "/adapter_config.json", config_text)
    write(name + "/adapter_model.safetensors", tensor_bytes)


adapter("adapter-nan", config(), safetensors(lora_tensors(a_value=float("nan"))))
adapter("adapter-infinite", config(), safetensors(lora_tensors(a_value=float("inf"))))
adapter("adapter-rank-mismatch", config(r=8), safetensors(lora_tensors(r=4)))
adapter("adapter-zero-length", config(), safetensors(lora_tensors(a_shape=[0, 64])))
adapter("adapter-config-not-json", "{\"r\": 4,", safetensors(lora_tensors()))
adapter("adapter-config-duplicate-keys", "{\"peft_type\": \"LORA\", \"r\": 4, \"r\": 8, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}",
        safetensors(lora_tensors()))
adapter("adapter-absurd-header-length", config(), struct.pack("<Q", 1 << 60) + b"{}")
adapter("adapter-no-tensors", config(), safetensors({}))
adapter("adapter-data-past-end", config(), safetensors({}, header_override=json.dumps(
    {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}).encode()))
