"""Train llmos-tiny, the project's default model, on the CPU, and write it as quantized GGUF files.

    python model/train.py [--out-dir model] [--work-dir DIR] [--steps N] [--threads 2]

Build-time only (torch==2.13.0 CPU). Same seed and thread count give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import (
    EOS,
    SEED,
    Example,
    TrainingStream,
    example_tokens,
    heldout_examples,
    packed_window,
    write_heldout,
)
from gguf_llama import FTYPE_Q4_K_M, FTYPE_Q8_0, LlamaConfig, quantize, write_gguf

MODEL_NAME = "llmos-tiny"
OUTPUTS = {"llmos-tiny-q8_0.gguf": FTYPE_Q8_0, "llmos-tiny-q4_k_m.gguf": FTYPE_Q4_K_M}
GGUF_EXTRA = {
    "llmos.prompt_template": "{prompt}\n",
    "llmos.self_test.prompt": "ping",
    "llmos.self_test.answer": "pong",
}


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg: LlamaConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate adjacent pairs (x0,x1), (x2,x3)...: llama.cpp's LLAMA rope mode, so q/k weights need no permutation.
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, f = cfg.n_embd, cfg.n_ff
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate = nn.Linear(d, f, bias=False)
        self.w_up = nn.Linear(d, f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.cfg.n_head, self.cfg.head_dim
        y = self.attn_norm(x)
        q = apply_rope(self.wq(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.wk(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
        v = self.wv(y).view(b, t, h, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        y = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.out = nn.Linear(cfg.n_embd, cfg.n_vocab, bias=False)
        cos, sin = rope_tables(cfg, cfg.n_ctx)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        # Scale the residual-branch outputs down with depth (GPT-2 style) so training starts stable at a high LR.
        for blk in self.blocks:
            assert isinstance(blk, Block)
            for lin in (blk.wo, blk.w_down):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids)
        cos, sin = self.cos[:t], self.sin[:t]
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.out(self.norm(x))

    def gguf_tensors(self) -> dict[str, np.ndarray]:
        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().to(torch.float32).numpy().copy()

        out = {"token_embd.weight": a(self.embed.weight)}
        for i, blk in enumerate(self.blocks):
            assert isinstance(blk, Block)
            out |= {
                f"blk.{i}.attn_norm.weight": a(blk.attn_norm.weight),
                f"blk.{i}.attn_q.weight": a(blk.wq.weight),
                f"blk.{i}.attn_k.weight": a(blk.wk.weight),
                f"blk.{i}.attn_v.weight": a(blk.wv.weight),
                f"blk.{i}.attn_output.weight": a(blk.wo.weight),
                f"blk.{i}.ffn_norm.weight": a(blk.ffn_norm.weight),
                f"blk.{i}.ffn_gate.weight": a(blk.w_gate.weight),
                f"blk.{i}.ffn_up.weight": a(blk.w_up.weight),
                f"blk.{i}.ffn_down.weight": a(blk.w_down.weight),
            }
        out["output_norm.weight"] = a(self.norm.weight)
        out["output.weight"] = a(self.out.weight)
        return out


def make_batch(stream: TrainingStream, batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Windows of ctx+1 tokens give ctx inputs and ctx shifted targets.
    ids, masks = zip(*(packed_window(stream, ctx + 1) for _ in range(batch)), strict=True)
    x = torch.tensor(ids, dtype=torch.long)
    m = torch.tensor(masks, dtype=torch.float32)
    return x[:, :-1], x[:, 1:], m[:, 1:]


@torch.no_grad()
def greedy_eval(model: Llama, examples: list[Example]) -> dict[str, tuple[int, int]]:
    """Exact-match accuracy per task under greedy decoding, computed in one teacher-forced pass: greedy decoding
    reproduces the answer (and its EOS) exactly iff the argmax at every answer position, given the correct prefix,
    is the correct next token. Right padding cannot change earlier positions under the causal mask."""
    model.eval()
    seqs = [example_tokens(ex) for ex in examples]
    n = max(len(ids) for ids, _ in seqs)
    x = torch.tensor([ids + [EOS] * (n - len(ids)) for ids, _ in seqs], dtype=torch.long)
    m = torch.tensor([mask + [0] * (n - len(mask)) for _, mask in seqs], dtype=torch.bool)
    score: dict[str, tuple[int, int]] = {}
    for i in range(0, len(examples), 64):
        pred = model(x[i : i + 64, :-1]).argmax(-1)
        ok_tok = (pred == x[i : i + 64, 1:]) | ~m[i : i + 64, 1:]
        for ex, ok in zip(examples[i : i + 64], ok_tok.all(-1).tolist(), strict=True):
            good, total = score.get(ex.task, (0, 0))
            score[ex.task] = (good + int(ok), total + 1)
        tok_ok = ((pred == x[i : i + 64, 1:]) & m[i : i + 64, 1:]).sum().item()
        score["answer_tokens"] = (
            score.get("answer_tokens", (0, 0))[0] + int(tok_ok),
            score.get("answer_tokens", (0, 0))[1] + int(m[i : i + 64, 1:].sum()),
        )
    model.train()
    return score


def run_phase(
    model: Llama,
    params: list[torch.nn.Parameter],
    args: argparse.Namespace,
    rank: int,
    phase: int,
    steps: int,
    lr: float,
    reverse_fraction: float,
    heldout: list[Example],
    log: Any,
) -> None:
    """One cosine learning-rate schedule over `steps` steps, with its own optimizer and data stream."""
    cfg = model.cfg
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))

    stream = TrainingStream(
        args.seed * 1000 + rank + 100 * phase,
        reverse_fraction=reverse_fraction,
        bare_fraction=args.polish_bare_fraction if phase == 1 else 0.0,
    )
    t0 = time.monotonic()
    for step in range(steps):
        x, y, m = make_batch(stream, args.batch, cfg.n_ctx)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(x)
        loss_tok = F.cross_entropy(logits.reshape(-1, cfg.n_vocab), y.reshape(-1), reduction="none")
        loss = (loss_tok * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.procs > 1:
            # One flat buffer: a single all-reduce per step. a+b is the same float on both sides, so every
            # process keeps bit-identical weights.
            flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
            dist.all_reduce(flat)
            flat /= args.procs
            off = 0
            for p in params:
                if p.grad is not None:
                    n = p.grad.numel()
                    p.grad.copy_(flat[off : off + n].view_as(p.grad))
                    off += n
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            el = time.monotonic() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(
                f"phase {phase + 1} step {step:5d}/{steps} loss {loss.item():.4f} {el:6.0f}s eta {eta:4.0f}s",
                flush=True,
            )
        if rank == 0 and args.eval_every and step and step % args.eval_every == 0:
            log(f"   held-out (torch f32): {greedy_eval(model, heldout)}", flush=True)


def train(rank: int, args: argparse.Namespace, init_file: str) -> None:
    """One training process. With --procs N, N single-threaded processes each train on their own data stream and
    average gradients every step: on 2 shared cores this beat one process with 2 OpenMP threads by about 3x (each op
    is small, and a descheduled thread stalls every op's barrier; here only the per-step all-reduce waits)."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.procs > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.procs)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    cfg = LlamaConfig(n_embd=args.embd, n_layer=args.layers, n_head=args.heads, n_ff=args.ff)
    cfg.check()
    model = Llama(cfg)
    params = list(model.parameters())
    log(f"== llmos-tiny: {cfg} params={sum(p.numel() for p in params):,}, {args.procs} process(es)", flush=True)

    if args.init:
        # Start from a checkpoint of the first phase (the same weights the first phase computes; for iterating on
        # the polishing phase without paying for the first one again).
        model.load_state_dict(torch.load(args.init))
        log(f"== initialised from {args.init}", flush=True)
    phases = [] if args.init else [(0, args.steps, args.lr, args.reverse_fraction)]
    if args.polish_steps:
        # A short second schedule at a lower learning rate with more FAQ: the FAQ's many phrasings are learnt
        # later than reversal (which is one rule), so they get the tail of the training.
        phases.append((1, args.polish_steps, args.polish_lr, args.polish_reverse_fraction))
    heldout = heldout_examples()
    t0 = time.monotonic()
    for phase, steps, lr, reverse_fraction in phases:
        run_phase(model, params, args, rank, phase, steps, lr, reverse_fraction, heldout, log)
    if args.procs > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    train_s = time.monotonic() - t0
    score = greedy_eval(model, heldout)
    log(f"== trained in {train_s:.0f}s; held-out exact match (torch f32): {score}", flush=True)
    work_dir: Path = args.work_dir or args.out_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.save_pt:
        torch.save(model.state_dict(), work_dir / "llmos-tiny.pt")
    if args.no_export:
        return

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = work_dir / "llmos-tiny-f32.gguf"
    write_gguf(f32, cfg, model.gguf_tensors(), MODEL_NAME, GGUF_EXTRA)
    sums = []
    for fname, ftype in OUTPUTS.items():
        quantize(f32, out_dir / fname, ftype, nthread=args.threads)
        digest = hashlib.sha256((out_dir / fname).read_bytes()).hexdigest()
        sums.append(f"{digest}  {fname}\n")
        print(f"== wrote {out_dir / fname} ({(out_dir / fname).stat().st_size:,} bytes)", flush=True)
    (out_dir / "SHA256SUMS").write_text("".join(sums))
    write_heldout(out_dir / "heldout.jsonl")
    print(f"== wrote {out_dir / 'SHA256SUMS'} and {out_dir / 'heldout.jsonl'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    ap.add_argument("--out-dir", type=Path, default=here)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the f32 GGUF goes (default: out-dir)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8, help="windows per step and process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ff", type=int, default=512)
    ap.add_argument("--procs", type=int, default=2, help="training processes (data parallel)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--reverse-fraction", type=float, default=0.75)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--polish-steps", type=int, default=300, help="second, FAQ-heavier phase (0: none)")
    ap.add_argument("--polish-lr", type=float, default=1e-3)
    ap.add_argument("--polish-reverse-fraction", type=float, default=0.4)
    ap.add_argument(
        "--polish-bare-fraction", type=float, default=0.2, help="share of FAQ examples that are bare keywords"
    )
    ap.add_argument("--init", type=Path, default=None, help="skip the first phase: start from this checkpoint")
    ap.add_argument("--save-pt", action="store_true")
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args()
    if args.procs == 1:
        train(0, args, "")
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(args, str(Path(tmp) / "rendezvous")), nprocs=args.procs, join=True)


if __name__ == "__main__":
    main()
