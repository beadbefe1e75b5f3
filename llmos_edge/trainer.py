"""A small trainer for llama-architecture models in numpy: forward pass, backward pass and AdamW.

Consolidation (finetune.py) fine-tunes the default model on the device, where PyTorch does not ship, and
llama.cpp's own training API has no loss mask (FINDINGS.md). The model family is the default model's
(model/README.md): token embedding, per layer RMSNorm -> causal multi-head attention with RoPE -> residual,
RMSNorm -> SwiGLU feed-forward -> residual, then RMSNorm and the output matrix. RoPE rotates adjacent pairs
(llama.cpp's normal mode, LLAMA_ROPE_TYPE_NORM), so the GGUF's q/k weights are used as they are. Weights are in
row-major [out, in] layout, named as in the GGUF. Everything is f32, the same arithmetic llama.cpp does on an f32
file; tests/unit/test_trainer.py checks the gradients by finite differences and tests/integration/test_trainer.py
the logits against llama.cpp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from llmos_edge.models import GGUFInfo

Array = npt.NDArray[np.floating[Any]]  # f32 on the device; the gradient test runs it in f64
Ids = npt.NDArray[np.int64]
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def of(cls, info: GGUFInfo) -> Shape:
        """The shape of a llama GGUF this trainer can run: one KV head per head, full-width RoPE, no biases."""
        n_embd, n_head = info.hparam("embedding_length"), info.hparam("attention.head_count")
        n_layer, n_ff = info.hparam("block_count"), info.hparam("feed_forward_length")
        n_ctx = info.hparam("context_length")
        if info.architecture != "llama" or not (n_embd and n_head and n_layer and n_ff and n_ctx):
            raise ValueError(f"{info.path}: not a llama model with the hyperparameters the trainer needs")
        if (info.hparam("attention.head_count_kv") or n_head) != n_head:
            raise ValueError(f"{info.path}: grouped-query attention is not supported by the trainer")
        if (info.hparam("rope.dimension_count") or n_embd // n_head) != n_embd // n_head:
            raise ValueError(f"{info.path}: partial RoPE is not supported by the trainer")
        n_vocab = next(t.shape[1] for t in info.tensors if t.name == "token_embd.weight")
        return cls(
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_ff=n_ff,
            n_ctx=n_ctx,
            rope_base=float(info.arch("rope.freq_base", 10000.0)),
            norm_eps=float(info.arch("attention.layer_norm_rms_epsilon", 1e-5)),
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.n_embd, self.n_ff
        out: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, d)}
        for i in range(self.n_layer):
            p = f"blk.{i}."
            out |= {
                p + "attn_norm.weight": (d,),
                p + "attn_q.weight": (d, d),
                p + "attn_k.weight": (d, d),
                p + "attn_v.weight": (d, d),
                p + "attn_output.weight": (d, d),
                p + "ffn_norm.weight": (d,),
                p + "ffn_gate.weight": (f, d),
                p + "ffn_up.weight": (f, d),
                p + "ffn_down.weight": (d, f),
            }
        out["output_norm.weight"] = (d,)
        out["output.weight"] = (self.n_vocab, d)
        return out


def random_weights(shape: Shape, seed: int = 0, std: float = 0.02) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(s)).astype(np.float32)
    return out


def _rope_tables(shape: Shape, n: int) -> tuple[Array, Array]:
    hd = shape.head_dim
    inv = shape.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rope(x: Array, cos: Array, sin: Array, inverse: bool = False) -> Array:
    """Rotate adjacent pairs (x0, x1), (x2, x3)... of the last axis by the position's angles; `inverse` rotates
    back, which is also the rotation's backward pass (its transpose)."""
    s = -sin if inverse else sin
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * s
    out[..., 1::2] = x0 * s + x1 * cos
    return out


def _rms(x: Array, g: Array, eps: float) -> tuple[Array, Array]:
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * g, r


def _rms_back(dy: Array, x: Array, r: Array, g: Array) -> tuple[Array, Array]:
    dg = np.sum(dy * x * r, axis=tuple(range(dy.ndim - 1)))
    dn = dy * g
    dx = r * dn - (r**3) * x * np.mean(dn * x, axis=-1, keepdims=True)
    return dx, dg


def _sigmoid(x: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


@dataclass
class _Cache:
    ids: Ids
    cos: Array
    sin: Array
    layers: list[dict[str, Array]] = field(default_factory=list)
    x_final: Array | None = None
    r_final: Array | None = None
    h_final: Array | None = None


def forward(w: dict[str, Array], shape: Shape, ids: Ids, keep: bool = False) -> tuple[Array, _Cache]:
    """Logits [B, T, V] for token ids [B, T]; with `keep`, what the backward pass needs."""
    b, t = ids.shape
    h, hd = shape.n_head, shape.head_dim
    cos, sin = _rope_tables(shape, t)
    cache = _Cache(ids, cos, sin)
    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    scale = np.float32(1.0 / math.sqrt(hd))
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        x_in = x
        y, r1 = _rms(x, w[p + "attn_norm.weight"], shape.norm_eps)

        def heads(a: Array) -> Array:
            return a.reshape(b, t, h, hd).transpose(0, 2, 1, 3)

        q = _rope(heads(y @ w[p + "attn_q.weight"].T), cos, sin)
        k = _rope(heads(y @ w[p + "attn_k.weight"].T), cos, sin)
        v = heads(y @ w[p + "attn_v.weight"].T)
        s = (q @ k.transpose(0, 1, 3, 2)) * scale + causal
        s -= s.max(axis=-1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(axis=-1, keepdims=True)
        a = (pr @ v).transpose(0, 2, 1, 3).reshape(b, t, shape.n_embd)
        x = x + a @ w[p + "attn_output.weight"].T
        x_mid = x
        y2, r2 = _rms(x, w[p + "ffn_norm.weight"], shape.norm_eps)
        g = y2 @ w[p + "ffn_gate.weight"].T
        u = y2 @ w[p + "ffn_up.weight"].T
        sg = _sigmoid(g)
        act = g * sg * u
        x = x + act @ w[p + "ffn_down.weight"].T
        if keep:
            cache.layers.append(
                {"x_in": x_in, "r1": r1, "y": y, "q": q, "k": k, "v": v, "p": pr, "a": a}
                | {"x_mid": x_mid, "r2": r2, "y2": y2, "g": g, "u": u, "sg": sg, "act": act}
            )
    hf, rf = _rms(x, w["output_norm.weight"], shape.norm_eps)
    if keep:
        cache.x_final, cache.r_final, cache.h_final = x, rf, hf
    return hf @ w["output.weight"].T, cache


def loss_and_grads(
    w: dict[str, Array], shape: Shape, ids: Ids, targets: Ids, mask: Array
) -> tuple[float, dict[str, Array]]:
    """Mean cross-entropy over the positions where `mask` is 1, and its gradient for every weight."""
    logits, c = forward(w, shape, ids, keep=True)
    b, t = ids.shape
    h, hd, d = shape.n_head, shape.head_dim, shape.n_embd
    z = logits - logits.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    sm = ez / ez.sum(axis=-1, keepdims=True)
    logp = z - np.log(ez.sum(axis=-1, keepdims=True))
    tok_logp = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = float(mask.sum()) or 1.0
    loss = float(-(tok_logp * mask).sum() / n)
    dlogits = sm
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(sm, targets[..., None], axis=-1) - 1.0, axis=-1)
    dlogits *= (mask / n)[..., None]
    grads: dict[str, Array] = {}

    def mm_grad(dout: Array, inp: Array) -> Array:
        return dout.reshape(-1, dout.shape[-1]).T @ inp.reshape(-1, inp.shape[-1])

    assert c.h_final is not None and c.x_final is not None and c.r_final is not None
    grads["output.weight"] = mm_grad(dlogits, c.h_final)
    dh = dlogits @ w["output.weight"]
    dx, grads["output_norm.weight"] = _rms_back(dh, c.x_final, c.r_final, w["output_norm.weight"])
    scale = np.float32(1.0 / math.sqrt(hd))
    for i in reversed(range(shape.n_layer)):
        p, L = f"blk.{i}.", c.layers[i]
        # feed-forward: x = x_mid + act @ Wd^T
        grads[p + "ffn_down.weight"] = mm_grad(dx, L["act"])
        dact = dx @ w[p + "ffn_down.weight"]
        g, sg = L["g"], L["sg"]
        du = dact * g * sg
        dg = dact * L["u"] * sg * (1.0 + g * (1.0 - sg))
        grads[p + "ffn_gate.weight"] = mm_grad(dg, L["y2"])
        grads[p + "ffn_up.weight"] = mm_grad(du, L["y2"])
        dy2 = dg @ w[p + "ffn_gate.weight"] + du @ w[p + "ffn_up.weight"]
        dxm, grads[p + "ffn_norm.weight"] = _rms_back(dy2, L["x_mid"], L["r2"], w[p + "ffn_norm.weight"])
        dx = dx + dxm
        # attention: x_mid = x_in + a @ Wo^T
        grads[p + "attn_output.weight"] = mm_grad(dx, L["a"])
        da = (dx @ w[p + "attn_output.weight"]).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        pr, q, k, v = L["p"], L["q"], L["k"], L["v"]
        dv: Array = pr.transpose(0, 1, 3, 2) @ da
        dp = da @ v.transpose(0, 1, 3, 2)
        ds: Array = pr * (dp - np.sum(dp * pr, axis=-1, keepdims=True)) * scale
        dq = _rope(ds @ k, c.cos, c.sin, inverse=True)
        dk = _rope(ds.transpose(0, 1, 3, 2) @ q, c.cos, c.sin, inverse=True)

        def merge(a: Array) -> Array:
            return a.transpose(0, 2, 1, 3).reshape(b, t, d)

        dq, dk, dv = merge(dq), merge(dk), merge(dv)
        y = L["y"]
        grads[p + "attn_q.weight"] = mm_grad(dq, y)
        grads[p + "attn_k.weight"] = mm_grad(dk, y)
        grads[p + "attn_v.weight"] = mm_grad(dv, y)
        dy = dq @ w[p + "attn_q.weight"] + dk @ w[p + "attn_k.weight"] + dv @ w[p + "attn_v.weight"]
        dxi, grads[p + "attn_norm.weight"] = _rms_back(dy, L["x_in"], L["r1"], w[p + "attn_norm.weight"])
        dx = dx + dxi
    demb = np.zeros_like(w["token_embd.weight"])
    np.add.at(demb, c.ids.reshape(-1), dx.reshape(-1, d))
    grads["token_embd.weight"] = demb
    return loss, grads


@dataclass
class AdamW:
    """AdamW as PyTorch computes it (decoupled weight decay on matrices only), with global-norm gradient clipping."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0
    step_count: int = 0
    m: dict[str, Array] = field(default_factory=dict)
    v: dict[str, Array] = field(default_factory=dict)

    def step(self, w: dict[str, Array], grads: dict[str, Array], lr: float | None = None) -> float:
        """Update `w` in place; returns the gradient's global norm before clipping."""
        lr = self.lr if lr is None else lr
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        k = min(1.0, self.clip / (norm + 1e-6)) if self.clip else 1.0
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.step_count, 1.0 - b2**self.step_count
        for name, g in grads.items():
            g = g * np.float32(k)
            m = self.m.setdefault(name, np.zeros_like(g))
            v = self.v.setdefault(name, np.zeros_like(g))
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * g * g
            p = w[name]
            if p.ndim == 2 and self.weight_decay:
                p *= np.float32(1.0 - lr * self.weight_decay)
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)
        return norm

    def state_bytes(self) -> int:
        return sum(a.nbytes for a in (*self.m.values(), *self.v.values()))


def describe(shape: Shape) -> dict[str, Any]:
    return {"n_params": sum(math.prod(s) for s in shape.tensor_shapes().values()), **shape.__dict__}
