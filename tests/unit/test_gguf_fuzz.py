"""Mutated GGUF headers through the whole path a model file takes before the engine sees it: read_gguf,
check_loadable, describe (what `llmos model-info` prints, with the memory estimate) and fit_context (the governor's
pre-flight). Each mutant is described or refused with a UserError of one sentence; anything else fails with the
mutant's number and mutations; `mutant(i, seeds())` makes it again.

Seeds: the headers of llama.cpp's 19 vocab-only GGUFs (long arrays cut to 100 items so a mutant is a few KB), the
same headers with the tensor table of the repo's model grafted on, and the repo's model itself. Tensor data is a
sparse extension of the mutant file, so it costs no writing.

Measured here (2 cores, load average 3.8 while a llama.cpp wheel was compiling): 10,000 mutants in 13 s (7.8 s
of CPU; `/usr/bin/time .venv/bin/pytest -q tests/unit/test_gguf_fuzz.py`), the pytest process's peak RSS 67 MB. The
mutants are written to /dev/shm: on this machine's ext4 the same run took 50 s.
"""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmos_edge.errors import UserError
from llmos_edge.models import MIB, check_loadable, describe, fit_context, read_gguf
from tests.gguf_blocks import Header, compact, split, vocab_files

N_MUTANTS = 10_000
SEED = 20261201
MODEL = Path(__file__).resolve().parents[2] / "model" / "llmos-tiny-q8_0.gguf"
FEATURES = frozenset({"avx2", "asimddp"})  # both repacking rule sets, without reading /proc/cpuinfo each time
U32 = [0, 1, 2, 7, 8, 9, 12, 13, 0x7F, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
U64 = [0, 1, 64, 65, 512, 513, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
BYTES = [0, 1, 0x7F, 0x80, 0xFF]


@dataclass(frozen=True)
class Seed:
    name: str
    header: Header
    data_bytes: int  # tensor data after the header


def seeds() -> list[Seed]:
    model = MODEL.read_bytes()
    tiny = split(model)
    tiny_data = len(model) - (tiny.size + 31) // 32 * 32
    out = [Seed(MODEL.name, tiny, tiny_data)]
    for p in vocab_files():
        h = compact(p)
        out.append(Seed(p.name, h, 0))
        out.append(Seed(p.name + "+weights", replace(h, tensors=tiny.tensors), tiny_data))
    return out


# Mutations of the header's structure (its key-value and tensor blocks) and of its bytes.
Mutation = Callable[[random.Random, Header, bytearray], None]


def _block_op(rng: random.Random, blocks: list[bytes]) -> None:
    if not blocks:
        return
    i, j = rng.randrange(len(blocks)), rng.randrange(len(blocks))
    op = rng.choice(["dup", "drop", "swap"])
    if op == "dup":
        blocks.insert(j, blocks[i])
    elif op == "drop":
        del blocks[i]
    else:
        blocks[i], blocks[j] = blocks[j], blocks[i]


def kv_blocks(rng: random.Random, h: Header, _: bytearray) -> None:
    _block_op(rng, h.kv)


def tensor_blocks(rng: random.Random, h: Header, _: bytearray) -> None:
    _block_op(rng, h.tensors)


def _kv_fields(block: bytes) -> tuple[int, int]:
    """Offsets in a key-value block of its value type and of its value."""
    t = 8 + struct.unpack_from("<Q", block)[0]
    return t, t + 4


def value_type(rng: random.Random, h: Header, _: bytearray) -> None:
    if h.kv:
        i = rng.randrange(len(h.kv))
        b = bytearray(h.kv[i])
        t, v = _kv_fields(b)
        # the value's own type, or an array's item type
        at = t if rng.random() < 0.6 or struct.unpack_from("<I", b, t)[0] != 9 else v
        struct.pack_into("<I", b, at, rng.choice([*range(14), *U32]))
        h.kv[i] = bytes(b)


def value_count(rng: random.Random, h: Header, _: bytearray) -> None:
    """A string's length, an array's count, or a scalar's value."""
    if h.kv:
        i = rng.randrange(len(h.kv))
        b = bytearray(h.kv[i])
        t, v = _kv_fields(b)
        vtype = struct.unpack_from("<I", b, t)[0]
        at = v + 4 if vtype == 9 else v
        if at + 8 <= len(b):
            struct.pack_into("<Q", b, at, rng.choice(U64))
        elif at + 4 <= len(b):
            struct.pack_into("<I", b, at, rng.choice(U32))
        h.kv[i] = bytes(b)


def tensor_field(rng: random.Random, h: Header, _: bytearray) -> None:
    """A tensor's dimension count, a dimension, its type or its offset."""
    if h.tensors:
        i = rng.randrange(len(h.tensors))
        b = bytearray(h.tensors[i])
        nd_at = 8 + struct.unpack_from("<Q", b)[0]
        n_dims = struct.unpack_from("<I", b, nd_at)[0]
        fields = [(nd_at, "<I"), *((nd_at + 4 + 8 * d, "<Q") for d in range(n_dims))]
        fields += [(nd_at + 4 + 8 * n_dims, "<I"), (nd_at + 8 + 8 * n_dims, "<Q")]
        at, fmt = rng.choice(fields)
        value = rng.choice(U32 if fmt == "<I" else U64) if rng.random() < 0.8 else rng.randrange(64)
        struct.pack_into(fmt, b, at, value)
        h.tensors[i] = bytes(b)


def bit_flip(rng: random.Random, _: Header, d: bytearray) -> None:
    i = rng.randrange(len(d))
    d[i] ^= 1 << rng.randrange(8)


def byte_overwrite(rng: random.Random, _: Header, d: bytearray) -> None:
    d[rng.randrange(len(d))] = rng.choice(BYTES)


def word_overwrite(rng: random.Random, _: Header, d: bytearray) -> None:
    """A u32 or u64 anywhere, the header's counts (bytes 8-24) more often."""
    at = rng.choice([8, 16]) if rng.random() < 0.2 else rng.randrange(4, len(d) - 8)
    if rng.random() < 0.5:
        struct.pack_into("<Q", d, at, rng.choice(U64))
    else:
        struct.pack_into("<I", d, at, rng.choice(U32))


def truncate(rng: random.Random, _: Header, d: bytearray) -> None:
    del d[rng.randrange(len(d)) :]


STRUCTURE = [kv_blocks, tensor_blocks, value_type, value_count, tensor_field]
BYTE_LEVEL = [bit_flip, bit_flip, byte_overwrite, byte_overwrite, word_overwrite, word_overwrite, truncate]


def mutant(i: int, all_seeds: list[Seed]) -> tuple[str, list[str], bytes, int]:
    """Mutant number `i`: its seed's name, the mutations applied, the header bytes, and the tensor data size."""
    rng = random.Random(SEED + i)
    seed = rng.choice(all_seeds)
    h = Header(seed.header.version, list(seed.header.kv), list(seed.header.tensors))
    structure = [rng.choice(STRUCTURE) for _ in range(rng.choice([0, 1, 1, 2]))]
    for m in structure:
        m(rng, h, bytearray())
    d = bytearray(h.to_bytes())
    byte_level = [rng.choice(BYTE_LEVEL) for _ in range(rng.choice([0, 1, 1, 2]) if structure else rng.choice([1, 2]))]
    for m in byte_level:
        if len(d) > 12:
            m(rng, h, d)
    return seed.name, [m.__name__ for m in structure + byte_level], bytes(d), seed.data_bytes


def _one_sentence(e: UserError) -> str | None:
    """What is wrong with the error as a user would see it, or None."""
    if "\n" in e.message or "\n" in e.hint:
        return "a message or hint of more than one line"
    if len(e.message) > 300:
        return f"a message of {len(e.message)} characters"
    if not e.hint:
        return "no hint"
    return None


def test_mutated_headers_are_described_or_refused_in_one_sentence(tmp_path: Path) -> None:
    all_seeds = seeds()
    # in memory where there is a tmpfs: writing the mutants to ext4 here took 5 times as long
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if os.access(shm, os.W_OK) else tmp_path) as d:
        run_mutants(all_seeds, Path(d) / "mutant.gguf")


def run_mutants(all_seeds: list[Seed], path: Path) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"described": 0, "refused by read_gguf": 0, "refused by fit_context": 0, "not loadable": 0}
    failures: list[str] = []
    for i in range(N_MUTANTS):
        name, mutations, data, data_bytes = mutant(i, all_seeds)
        with path.open("wb") as f:
            f.write(data)
            f.truncate((len(data) + 63) // 64 * 64 + data_bytes)
        rng = random.Random(SEED - i)
        stage = "read_gguf"
        try:
            info = read_gguf(path)
            stage = "check_loadable"
            try:
                check_loadable(info)
            except UserError as e:
                outcomes["not loadable"] += 1  # and still described
                problem = _one_sentence(e)
                if problem:
                    failures.append(f"mutant {i} ({name}: {', '.join(mutations)}): check_loadable gave {problem}: {e}")
            stage = "describe"
            json.dumps(describe(info, features=FEATURES), allow_nan=False)
            stage = "fit_context"
            fit_context(info, rng.choice([64, 512, 4096, 10**9]) * MIB, rng.choice([256, 512, 2048]), features=FEATURES)
            outcomes["described"] += 1
        except UserError as e:
            outcomes[f"refused by {stage}"] += 1
            problem = _one_sentence(e)
            if problem:
                failures.append(f"mutant {i} ({name}: {', '.join(mutations)}): {stage} gave {problem}: {e}")
        except Exception:  # anything but a UserError is the failure this test looks for
            failures.append(f"mutant {i} ({name}: {', '.join(mutations)}): {stage} raised {traceback.format_exc()}")
        if len(failures) >= 5:
            break
    assert not failures, "\n".join(failures)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB
    assert grown < 256 * 1024, f"peak RSS grew by {grown // 1024} MiB over the mutants"
    # the mutants reach every stage, not only the reader's first checks
    assert all(n > N_MUTANTS // 50 for n in outcomes.values()), outcomes
