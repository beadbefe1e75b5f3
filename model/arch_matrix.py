"""Write tiny random-weight GGUFs of many llama.cpp architectures, each with a real tokenizer and chat template.

    python model/arch_matrix.py OUT_DIR [--vocab-dir DIR] [--only NAME ...]

Each model takes every `tokenizer.*` key of one of llama.cpp's vocab-only GGUFs ($LLMOS_VOCAB_DIR, made by
`make vocab`), so it tokenizes and formats chats exactly as the real family does; where that file has no chat
template, a real one from $LLMOS_VOCAB_DIR/templates is added. The weights are random (seeded): what these models
say is noise, but they load through the same code paths as the real ones, and cost what their shapes cost.

Tensor names and shapes follow llama.cpp's loader for each architecture (src/models/<arch>.cpp,
`load_arch_tensors`), which is stricter than gguf-py's MODEL_TENSORS lists (those include the optional ones).
Real vocabularies have 32k-262k tokens, so the embedding dominates: n_embd stays at 64 for most.
Needs gguf and numpy; llama_cpp only for the one model quantized by llama.cpp's own quantizer (Q4_K_M).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_llama import FTYPE_F16, FTYPE_F32, FTYPE_Q4_K_M, FTYPE_Q8_0, quantize

N_CTX_TRAIN = 4096  # above any context the tests use (gpt2's position embedding has this many rows)


@dataclass(frozen=True)
class Arch:
    """One model of the matrix: an architecture, the vocab file it borrows, and the shape of its layers."""

    name: str  # the file is <name>.gguf
    arch: str  # general.architecture
    vocab: str  # $LLMOS_VOCAB_DIR/ggml-vocab-<vocab>.gguf
    template: str = ""  # $LLMOS_VOCAB_DIR/templates/<template>.jinja, replacing the vocab file's (if any)
    quant: str = "Q8_0"  # Q8_0 | F16 (written here) | Q4_K_M (llama.cpp's quantizer)
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 0  # 0: n_head
    n_ff: int = 192
    n_layer: int = 2
    norm: str = "rms"  # rms | layer (LayerNorm, with biases unless norm_bias is False)
    norm_bias: bool = True
    qkv: str = "split"  # split (attn_q/k/v) | fused (attn_qkv)
    qkv_bias: bool = False
    out_bias: bool = False
    ffn: str = "gated"  # gated (gate, up, down) | plain (up, down) | phi3 (up of 2 n_ff, down)
    ffn_bias: bool = False
    ffn_norm: bool = True  # False: attention and feed-forward share attn_norm (parallel blocks)
    qk_norm: bool = False  # attn_q_norm and attn_k_norm of {head_dim}
    post_norms: bool = False  # gemma's attn_post_norm and ffn_post_norm
    pos_embd: bool = False  # learned absolute positions (gpt2)
    output: bool = True  # False: the output matrix is the token embedding (tied)
    rope_dims: int = 0  # rope.dimension_count when partial (gpt-neox)
    extra: tuple[tuple[str, Any], ...] = ()  # more <arch>.* keys: (suffix, value)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head_kv or self.n_head


# GPT-2's block, shared by its descendants: LayerNorm with biases, fused QKV, a plain GELU feed-forward, biases
# everywhere.
GPT_BLOCK: dict[str, Any] = dict(norm="layer", qkv="fused", qkv_bias=True, out_bias=True, ffn="plain", ffn_bias=True)
NO_BIAS: dict[str, Any] = dict(norm="layer", norm_bias=False)  # LayerNorm without biases (MPT, Command-R)

ARCHS = [
    # Llama 2's SentencePiece vocabulary (no chat template of its own), quantized by llama.cpp to Q4_K_M, whose
    # rows must be multiples of 256.
    Arch("llama-spm", "llama", "llama-spm", quant="Q4_K_M", n_embd=256, n_head=4, n_ff=512),
    Arch("llama3", "llama", "llama-bpe", template="meta-llama-Llama-3.2-3B-Instruct", n_head_kv=2, output=False),
    Arch("qwen2", "qwen2", "qwen2", qkv_bias=True, output=False),
    Arch("qwen3", "qwen3", "qwen35", template="Qwen-Qwen3-0.6B", n_head_kv=2, qk_norm=True, output=False),
    Arch("phi3", "phi3", "phi-3", quant="F16", qkv="fused", ffn="phi3"),
    Arch("gemma3", "gemma3", "gemma-4", n_head_kv=1, qk_norm=True, post_norms=True, output=False),
    # Gemma 2's soft-capped logits and sliding-window KV cache, with Gemma 2's own template on Gemma's vocabulary.
    Arch(
        "gemma2",
        "gemma2",
        "gemma-4",
        template="google-gemma-2-2b-it",
        n_head_kv=2,
        post_norms=True,
        output=False,
        extra=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)),
    ),
    Arch("gpt2", "gpt2", "gpt-2", quant="F16", pos_embd=True, output=False, **GPT_BLOCK),
    Arch("stablelm", "stablelm", "gpt-neox", norm="layer"),
    Arch("starcoder2", "starcoder2", "starcoder", n_head_kv=2, output=False, **{**GPT_BLOCK, "qkv": "split"}),
    Arch("falcon", "falcon", "falcon", n_head_kv=1, norm="layer", qkv="fused", ffn="plain", ffn_norm=False),
    Arch("gptneox", "gptneox", "gpt-neox", rope_dims=8, extra=(("use_parallel_residual", True),), **GPT_BLOCK),
    Arch(
        "mpt",
        "mpt",
        "mpt",
        **NO_BIAS,
        qkv="fused",
        ffn="plain",
        output=False,
        extra=(("attention.max_alibi_bias", 8.0),),
    ),
    Arch("refact", "refact", "refact", n_head_kv=1),
    Arch(
        "command-r", "command-r", "command-r", **NO_BIAS, ffn_norm=False, output=False, extra=(("logit_scale", 0.0625),)
    ),
    Arch("baichuan", "baichuan", "baichuan"),
]


def tensor_shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensors for this architecture, with ggml shapes ({ne0, ne1}: ne0 is the row length)."""
    d, f, hd = a.n_embd, a.n_ff, a.head_dim
    d_kv = a.kv_heads * hd
    n_vocab = -1  # filled in by the caller, from the vocab file
    s: dict[str, tuple[int, ...]] = {"token_embd.weight": (d, n_vocab)}
    if a.pos_embd:
        s["position_embd.weight"] = (d, N_CTX_TRAIN)

    def norm(prefix: str) -> None:
        s[f"{prefix}.weight"] = (d,)
        if a.norm == "layer" and a.norm_bias:
            s[f"{prefix}.bias"] = (d,)

    for i in range(a.n_layer):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm")
        if a.qkv == "fused":
            s[f"{b}.attn_qkv.weight"] = (d, d + 2 * d_kv)
            if a.qkv_bias:
                s[f"{b}.attn_qkv.bias"] = (d + 2 * d_kv,)
        else:
            for x, n in (("q", d), ("k", d_kv), ("v", d_kv)):
                s[f"{b}.attn_{x}.weight"] = (d, n)
                if a.qkv_bias:
                    s[f"{b}.attn_{x}.bias"] = (n,)
        if a.qk_norm:
            s[f"{b}.attn_q_norm.weight"] = (hd,)
            s[f"{b}.attn_k_norm.weight"] = (hd,)
        s[f"{b}.attn_output.weight"] = (d, d)
        if a.out_bias:
            s[f"{b}.attn_output.bias"] = (d,)
        if a.post_norms:
            norm(f"{b}.post_attention_norm")
        if a.ffn_norm:
            norm(f"{b}.ffn_norm")
        if a.ffn == "gated":
            s[f"{b}.ffn_gate.weight"] = (d, f)
        s[f"{b}.ffn_up.weight"] = (d, 2 * f if a.ffn == "phi3" else f)
        s[f"{b}.ffn_down.weight"] = (f, d)
        if a.ffn_bias:
            s[f"{b}.ffn_up.bias"] = (f,)
            s[f"{b}.ffn_down.bias"] = (d,)
        if a.post_norms:
            norm(f"{b}.post_ffw_norm")
    norm("output_norm")
    if a.output:
        s["output.weight"] = (d, n_vocab)
    return s


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def tokenizer_fields(vocab_file: Path) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every tokenizer.* key of a vocab-only GGUF, with its GGUF types, to copy as it is (strings stay bytes).

    A plain struct walk: gguf.GGUFReader makes numpy views per array item and takes about a minute on the
    262k-token vocabularies."""
    buf = vocab_file.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n : pos]

    def value(vtype: int) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return string()
        if vtype == gguf.GGUFValueType.ARRAY:
            sub, count = take("<I"), take("<Q")
            return [value(sub) for _ in range(count)]
        return take(_SCALAR_FORMATS[vtype])

    if buf[:4] != b"GGUF":
        raise ValueError(f"{vocab_file} is not a GGUF file")
    pos = 8
    _n_tensors, n_kv = take("<Q"), take("<Q")
    out = []
    for _ in range(n_kv):
        key = string().decode()
        vtype = take("<I")
        sub = struct.unpack_from("<I", buf, pos)[0] if vtype == gguf.GGUFValueType.ARRAY else None
        v = value(vtype)
        if key.startswith("tokenizer."):
            out.append((key, v, gguf.GGUFValueType(vtype), None if sub is None else gguf.GGUFValueType(sub)))
    return out


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """numpy layout is ggml's reversed ([ne1, ne0]). Norms are ones and biases zeros, so activations stay sane."""
    np_shape = tuple(reversed(shape))
    if name.endswith(".bias"):
        return np.zeros(np_shape, np.float32)
    if len(shape) == 1 or "_norm" in name or name.endswith("norm.weight"):
        return np.ones(np_shape, np.float32)
    return rng.normal(0.0, 0.02, np_shape).astype(np.float32)


def write_model(a: Arch, vocab_dir: Path, path: Path, seed: int = 0) -> None:
    fields = tokenizer_fields(vocab_dir / f"ggml-vocab-{a.vocab}.gguf")
    n_vocab = next(len(v) for k, v, _t, _s in fields if k == "tokenizer.ggml.tokens")
    if a.template:
        template = (vocab_dir / "templates" / f"{a.template}.jinja").read_text()
        fields = [fl for fl in fields if fl[0] != "tokenizer.chat_template"]
        fields.append(("tokenizer.chat_template", template, gguf.GGUFValueType.STRING, None))
    shapes = {n: tuple(n_vocab if x == -1 else x for x in s) for n, s in tensor_shapes(a).items()}
    # A seed per model, so adding a model to the list never changes the others.
    rng = np.random.default_rng([seed, zlib.crc32(a.name.encode())])
    store = {"Q8_0": FTYPE_Q8_0, "F16": FTYPE_F16}.get(a.quant, FTYPE_F32)

    w = gguf.GGUFWriter(str(path), a.arch)
    w.add_name(f"llmos-arch-{a.name}")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(a.n_embd)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.n_ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.kv_heads)
    if a.rope_dims:
        w.add_rope_dimension_count(a.rope_dims)
    if a.norm == "rms":
        w.add_layer_norm_rms_eps(1e-6)
    else:
        w.add_layer_norm_eps(1e-5)
    w.add_file_type(store)
    for suffix, value in a.extra:
        key = f"{a.arch}.{suffix}"
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, float(value))
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, shape in shapes.items():
        data = random_tensor(rng, name, shape)
        if len(shape) == 1 or store == FTYPE_F32:
            w.add_tensor(name, data)
        elif store == FTYPE_F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build(a: Arch, vocab_dir: Path, out: Path, seed: int, threads: int) -> Path:
    """Write one model beside its target and rename it into place, so make never takes a half file as done."""
    target = out / f"{a.name}.gguf"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        part = Path(tmp) / target.name
        if a.quant == "Q4_K_M":
            f32 = Path(tmp) / "f32.gguf"
            write_model(a, vocab_dir, f32, seed)
            quantize(f32, part, FTYPE_Q4_K_M, nthread=threads)
        else:
            write_model(a, vocab_dir, part, seed)
        part.replace(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--vocab-dir",
        type=Path,
        default=Path(os.environ.get("LLMOS_VOCAB_DIR", Path.home() / ".cache" / "llmos-edge" / "vocab")),
        help="llama.cpp's vocab-only GGUFs and templates/ (default $LLMOS_VOCAB_DIR)",
    )
    ap.add_argument("--only", action="append", help="build only this model (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.vocab_dir / "ggml-vocab-llama-spm.gguf").exists():
        ap.error(f"no vocab files in {args.vocab_dir}; `make vocab` extracts them")
    chosen = [a for a in ARCHS if not args.only or a.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        ap.error(f"--only: known models are {', '.join(a.name for a in ARCHS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.only:
        # The tests load every model in the directory: one dropped from the list must not linger there.
        for stale in set(args.out.glob("*.gguf")) - {args.out / f"{a.name}.gguf" for a in ARCHS}:
            stale.unlink()
    for a in chosen:
        t0 = time.monotonic()
        path = build(a, args.vocab_dir, args.out, args.seed, args.threads)
        print(
            f"== {a.name:<11} {a.arch:<11} vocab {a.vocab:<10} {a.quant:<6} {path.stat().st_size / 2**20:5.1f} MiB"
            f" in {time.monotonic() - t0:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
