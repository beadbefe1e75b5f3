"""Write a llama-architecture GGUF from numpy arrays and quantize it with llama.cpp's own quantizer.

Shared by train.py (the trained llmos-tiny) and speed.py (random weights for benchmarks); needs gguf and numpy,
not torch, so the speed model can be built without the training environment.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from data import BOS, EOS, TOKEN_TYPES, UNK, VOCAB

# llama_ftype values of llama.cpp (llama.h)
FTYPE_F32, FTYPE_F16, FTYPE_Q8_0, FTYPE_Q4_K_M = 0, 1, 7, 15


@dataclass(frozen=True)
class LlamaConfig:
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 8
    n_ff: int = 768
    n_ctx: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def n_vocab(self) -> int:
        return len(VOCAB)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> None:
        # Every weight row (the input dimension of each matmul) must be a multiple of 256, the k-quant block size,
        # or llama.cpp's quantizer silently falls back to other types for that tensor.
        for name, v in (("n_embd", self.n_embd), ("n_ff", self.n_ff)):
            if v % 256:
                raise ValueError(f"{name}={v} is not a multiple of 256")
        if self.n_embd % self.n_head or self.head_dim % 2:
            raise ValueError("n_embd must split into heads of even size")

    def n_params(self) -> int:
        d, f = self.n_embd, self.n_ff
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        return 2 * self.n_vocab * d + self.n_layer * per_layer + d


def tensor_names(cfg: LlamaConfig) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(cfg.n_layer):
        names += [
            f"blk.{i}.attn_norm.weight",
            f"blk.{i}.attn_q.weight",
            f"blk.{i}.attn_k.weight",
            f"blk.{i}.attn_v.weight",
            f"blk.{i}.attn_output.weight",
            f"blk.{i}.ffn_norm.weight",
            f"blk.{i}.ffn_gate.weight",
            f"blk.{i}.ffn_up.weight",
            f"blk.{i}.ffn_down.weight",
        ]
    return [*names, "output_norm.weight", "output.weight"]


def write_gguf(
    path: Path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], name: str, extra: dict[str, str] | None = None
) -> None:
    """Tensors are in PyTorch layout ([out, in] for matmuls), f32. q/k are written as they are: the model applies
    RoPE to adjacent pairs, which is what llama.cpp's llama architecture does, so no permutation is needed."""
    cfg.check()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(FTYPE_F32)

    w.add_tokenizer_model("llama")
    w.add_token_list(VOCAB)
    # Single characters only: there is nothing to merge, so the scores never decide anything.
    w.add_token_scores([0.0] * len(VOCAB))
    w.add_token_types(TOKEN_TYPES)
    w.add_unk_token_id(UNK)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # Without this llama.cpp prepends a space to every prompt, which the model never saw in training.
    w.add_add_space_prefix(False)
    for k, v in (extra or {}).items():
        w.add_string(k, v)

    for tname in tensor_names(cfg):
        w.add_tensor(tname, np.ascontiguousarray(tensors[tname], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def site_bin_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent.parent / "bin"


_backends_loaded = False


def load_backends() -> None:
    """The wheel is built with GGML_BACKEND_DL: its CPU variants sit in site-packages/bin where ggml does not look,
    so they must be loaded through the library's own registry before a model can be created."""
    global _backends_loaded
    if _backends_loaded:
        return
    import llama_cpp

    fn = llama_cpp.llama_cpp._lib.ggml_backend_load_all_from_path
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = None
    fn(str(site_bin_dir()).encode())
    _backends_loaded = True


def quantize(src: Path, dst: Path, ftype: int, nthread: int = 2) -> None:
    import llama_cpp

    load_backends()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype={ftype}) failed: {rc}")
