"""A GGUF model's tensors as numpy arrays, and a fine-tuned model written back as an f32 GGUF.

On-device consolidation (finetune.py) trains the default model's weights in numpy (trainer.py). Its master
copy is the built-in Q8_0 file itself, dequantized here: Q8_0 stores each block of 32 weights as int8 times one
f16 scale, so dequantizing and quantizing again to Q8_0 gives back the same bytes, and no f32 file (8.6 MB) has to
ship in the image. F32 and F16 tensors are read as they are; any other type is refused (a k-quant file is a lossy
copy of its master, and training on it would compound the loss).

The f32 file a fine-tune writes copies its source's header byte for byte (tokenizer, prompt template, self-test,
hyperparameters), with `general.file_type` set to F32, a tensor table of F32 tensors in the source's order, and the
new weights; llama.cpp's quantizer (models.quantize) turns it into the type the device runs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llmos_edge.errors import UserError
from llmos_edge.models import FILE_TYPES, GGML_TYPES, GGUFInfo, kv_spans, read_gguf

Array = npt.NDArray[np.float32]
F32, F16, Q8_0 = 0, 1, 8  # ggml type ids
QK8_0 = 32


def _dequantize(raw: bytes, type_id: int, n: int) -> Array:
    if type_id == F32:
        return np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)
    if type_id == F16:
        return np.frombuffer(raw, dtype="<f2", count=n).astype(np.float32)
    if type_id == Q8_0:
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 + QK8_0)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    raise ValueError(type_id)


def load(path: str | os.PathLike[str]) -> tuple[GGUFInfo, dict[str, Array]]:
    """The file's header and its tensors as f32 arrays in row-major [out, in] layout (GGUF's shape reversed)."""
    info = read_gguf(path)
    tensors: dict[str, Array] = {}
    with Path(path).open("rb") as f:
        for t in info.tensors:
            if t.type_id not in (F32, F16, Q8_0):
                raise UserError(
                    f"{info.path} holds {GGML_TYPES[t.type_id][0]} tensors ({t.name}); consolidation trains from "
                    "F32, F16 or Q8_0 weights",
                    "set learning.consolidate_master to the Q8_0 file of the model",
                )
            f.seek(info.data_offset + t.offset)
            nbytes = t.n_bytes or 0
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise UserError(f"{info.path} is truncated at tensor {t.name}", "copy the model file again")
            tensors[t.name] = _dequantize(raw, t.type_id, t.n_elements).reshape(t.shape[::-1])
    return info, tensors


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def write_f32(src: GGUFInfo, tensors: dict[str, Array], dst: str | os.PathLike[str]) -> None:
    """Write `tensors` (every tensor of `src`, same shapes) as an f32 GGUF whose metadata is `src`'s."""
    spans, kv_end = kv_spans(src.path)
    align = int(src.metadata.get("general.alignment", 32))
    with src.path.open("rb") as f:
        head = bytearray(f.read(kv_end))
    ftype = spans.get("general.file_type")
    if ftype is not None:  # F32 = 0 in llama_ftype, written in the value's own width
        _vtype, start, end = ftype
        head[start:end] = bytes(end - start)
    out = bytearray(head)
    offset = 0
    for t in src.tensors:
        a = tensors[t.name]
        if a.shape != t.shape[::-1]:
            raise ValueError(f"{t.name}: shape {a.shape}, the model has {t.shape[::-1]}")
        name = t.name.encode()
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape))
        out += b"".join(struct.pack("<Q", d) for d in t.shape)
        out += struct.pack("<IQ", F32, offset)
        offset += _align(a.size * 4, align)
    out += bytes(_align(len(out), align) - len(out))
    part = Path(dst).with_name(Path(dst).name + ".part")
    with part.open("wb") as f:
        f.write(out)
        for t in src.tensors:
            data = np.ascontiguousarray(tensors[t.name], dtype="<f4").tobytes()
            f.write(data + bytes(_align(len(data), align) - len(data)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, dst)


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quantization: str, threads: int = 1) -> None:
    """llama.cpp's own quantizer, f32 GGUF -> `quantization` (a FILE_TYPES name such as Q8_0 or Q4_K_M). Needs a
    CPU backend loaded in this process (engine_worker.load_cpu_backend)."""
    import ctypes

    import llama_cpp

    ftype = next((k for k, v in FILE_TYPES.items() if v == quantization), None)
    if ftype is None:
        raise UserError(f"llama.cpp has no quantization named {quantization}", "use Q8_0 or Q4_K_M")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    part = Path(dst).with_name(Path(dst).name + ".part")
    if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(part), ctypes.byref(params)) != 0:
        part.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize {src} to {quantization}", "see the log for llama.cpp's reason")
    os.replace(part, dst)
