"""Write a random-weight model of llmos-tiny's family, bigger, quantized to Q4_K_M, for speed benchmarks.

    python model/speed.py OUT.gguf [--params 50M]

Nothing is trained: the tokens it generates are noise, but its cost per token is that of a real model this size.
Same tokenizer and architecture as llmos-tiny; only n_layer changes with --params (n_embd 768, n_ff 2048).
Needs gguf, numpy and llama_cpp (for the quantizer), not torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_llama import FTYPE_Q4_K_M, LlamaConfig, quantize, tensor_names, write_gguf

N_EMBD, N_FF, N_HEAD = 768, 2048, 12
MIN_PARAMS, MAX_PARAMS = 25_000_000, 85_000_000


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(t[-1:], 1)
    return int(float(t.rstrip("KM")) * mult)


def config_for(n_params: int) -> LlamaConfig:
    """The layer count whose total is closest to n_params."""
    best = min(
        range(1, 64),
        key=lambda n: abs(LlamaConfig(n_embd=N_EMBD, n_layer=n, n_head=N_HEAD, n_ff=N_FF).n_params() - n_params),
    )
    # A context like the appliance's real use, so benchmarks can fill a long prompt.
    return LlamaConfig(n_embd=N_EMBD, n_layer=best, n_head=N_HEAD, n_ff=N_FF, n_ctx=2048)


def random_tensors(cfg: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = cfg.n_embd, cfg.n_ff, cfg.n_vocab
    shapes: dict[str, tuple[int, ...]] = {}
    for name in tensor_names(cfg):
        if name.endswith("norm.weight"):
            shapes[name] = (d,)
        elif name in ("token_embd.weight", "output.weight"):
            shapes[name] = (v, d)
        elif name.endswith(("ffn_gate.weight", "ffn_up.weight")):
            shapes[name] = (f, d)
        elif name.endswith("ffn_down.weight"):
            shapes[name] = (d, f)
        else:
            shapes[name] = (d, d)
    return {
        n: np.ones(s, np.float32) if len(s) == 1 else rng.normal(0.0, 0.02, s).astype(np.float32)
        for n, s in shapes.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--params", default="50M", help="target parameter count, 25M-85M (default 50M)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    target = parse_size(args.params)
    if not MIN_PARAMS <= target <= MAX_PARAMS:
        ap.error(f"--params must be within 25M-85M, got {args.params}")
    cfg = config_for(target)
    t0 = time.monotonic()
    print(f"== speed model: {cfg.n_layer} layers, {cfg.n_params():,} params -> {args.out}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        f32 = Path(tmp) / "speed-f32.gguf"
        write_gguf(f32, cfg, random_tensors(cfg, args.seed), f"llmos-speed-{target // 1_000_000}m")
        # Write beside the target and rename, so an interrupted build never leaves a half file that make
        # would take as up to date.
        part = Path(tmp) / "speed-q4_k_m.gguf"
        quantize(f32, part, FTYPE_Q4_K_M, nthread=args.threads)
        part.replace(args.out)
    print(f"== wrote {args.out} ({args.out.stat().st_size:,} bytes) in {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
