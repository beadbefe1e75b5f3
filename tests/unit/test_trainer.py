"""The numpy trainer's backward pass against finite differences, and AdamW against its written-out formula."""

from __future__ import annotations

import numpy as np

from llmos_edge.trainer import AdamW, Shape, forward, loss_and_grads, random_weights

TINY = Shape(n_vocab=11, n_embd=8, n_layer=2, n_head=2, n_ff=12, n_ctx=16)


def _batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.n_vocab, size=(2, 7))
    targets = rng.integers(0, TINY.n_vocab, size=(2, 7))
    mask = (rng.random((2, 7)) < 0.6).astype(np.float64)
    mask[0, -1] = 1.0
    return ids, targets, mask


def _weights() -> dict[str, np.ndarray]:
    # float64 so that central differences are accurate to ~1e-9; larger weights than at init so every path matters
    return {k: v.astype(np.float64) for k, v in random_weights(TINY, seed=3, std=0.4).items()}


def test_gradients_match_finite_differences_for_every_tensor() -> None:
    w = _weights()
    ids, targets, mask = _batch()
    _, grads = loss_and_grads(w, TINY, ids, targets, mask)
    assert set(grads) == set(w)
    rng = np.random.default_rng(5)
    eps = 1e-6
    for name, p in w.items():
        for _ in range(4):
            idx = tuple(int(rng.integers(0, n)) for n in p.shape)
            if name == "token_embd.weight":  # a row the batch uses, or the gradient is trivially 0
                idx = (int(ids[0, 2]), idx[1])
            old = p[idx]
            p[idx] = old + eps
            up, _ = loss_and_grads(w, TINY, ids, targets, mask)
            p[idx] = old - eps
            down, _ = loss_and_grads(w, TINY, ids, targets, mask)
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - grads[name][idx]) <= 1e-6 + 1e-5 * abs(numeric), (name, idx, numeric, grads[name][idx])


def test_masked_positions_do_not_contribute() -> None:
    w = _weights()
    ids, targets, mask = _batch()
    loss, _ = loss_and_grads(w, TINY, ids, targets, mask)
    other = targets.copy()
    other[mask == 0] = (other[mask == 0] + 1) % TINY.n_vocab
    assert loss_and_grads(w, TINY, ids, other, mask)[0] == loss


def test_attention_is_causal() -> None:
    w = _weights()
    ids, _, _ = _batch()
    changed = ids.copy()
    changed[:, 4] = (changed[:, 4] + 1) % TINY.n_vocab
    a, _ = forward(w, TINY, ids)
    b, _ = forward(w, TINY, changed)
    assert np.array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_adamw_step_is_the_written_formula() -> None:
    w = {"m": np.array([[1.0, -2.0]]), "n": np.array([0.5])}
    g = {"m": np.array([[0.1, 0.2]]), "n": np.array([-0.3])}
    opt = AdamW(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, clip=0.0)
    opt.step(w, g)
    # step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps); decay only on the matrix
    np.testing.assert_allclose(w["m"], [[1.0 * (1 - 0.05) - 0.1, -2.0 * (1 - 0.05) - 0.1]], rtol=1e-6)
    np.testing.assert_allclose(w["n"], [0.5 + 0.1], rtol=1e-6)


def test_adamw_clips_the_global_norm() -> None:
    w = {"a": np.zeros(2)}
    opt = AdamW(lr=0.1, clip=1.0, weight_decay=0.0)
    assert opt.step(w, {"a": np.array([30.0, 40.0])}) == 50.0
    np.testing.assert_allclose(opt.m["a"], 0.1 * np.array([0.6, 0.8]), rtol=1e-5)


def test_training_steps_lower_the_loss() -> None:
    w = _weights()
    ids, targets, mask = _batch()
    first, _ = loss_and_grads(w, TINY, ids, targets, mask)
    opt = AdamW(lr=0.02)
    for _ in range(30):
        loss, grads = loss_and_grads(w, TINY, ids, targets, mask)
        opt.step(w, grads)
    assert loss < first / 2
