"""Three small byte-level language models with hand-written forward and backward passes.

Each reads the embeddings of the last ``context`` bytes (concatenated) and predicts the next
byte over 256 classes:
  mlp     X -> tanh(X W1 + b1) -> W2 -> logits
  resmlp  X -> h = X Win + bin; per block h += tanh(rms(h) Wa + ba) Wb; rms(h) Wout -> logits
  hybrid  the mlp path plus a learned bigram table G[previous byte] added to the logits
Low-precision formats are emulated by ``quant``: the forward pass sees rounded weights
(the caller rounds them) and rounds every activation it produces; gradients pass straight
through the rounding and are kept in float32 against float32 master weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Params = dict[str, F32]
Quant = Callable[[F32], F32]
VOCAB = 256
RMS_EPS = 1e-5


def _identity(x: F32) -> F32:
    return x


@dataclass(frozen=True)
class Arch:
    kind: str  # mlp | resmlp | hybrid
    hidden: int
    context: int
    embed: int
    blocks: int = 1

    @property
    def n_in(self) -> int:
        return self.context * self.embed


def init_params(arch: Arch, rng: np.random.Generator) -> Params:
    """Scaled normal initialisation; output layers start small so BPB starts near 8."""

    def normal(*shape: int, std: float) -> F32:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    h, n_in = arch.hidden, arch.n_in
    p: Params = {"E": normal(VOCAB, arch.embed, std=1.0)}
    if arch.kind in ("mlp", "hybrid"):
        p["W1"] = normal(n_in, h, std=n_in**-0.5)
        p["b1"] = np.zeros(h, np.float32)
        p["W2"] = normal(h, VOCAB, std=0.01)
        p["b2"] = np.zeros(VOCAB, np.float32)
        if arch.kind == "hybrid":
            p["G"] = np.zeros((VOCAB, VOCAB), np.float32)
    elif arch.kind == "resmlp":
        p["Win"] = normal(n_in, h, std=n_in**-0.5)
        p["bin"] = np.zeros(h, np.float32)
        for k in range(arch.blocks):
            p[f"Wa{k}"] = normal(h, h, std=h**-0.5)
            p[f"ba{k}"] = np.zeros(h, np.float32)
            p[f"Wb{k}"] = normal(h, h, std=0.1 * h**-0.5)
        p["Wout"] = normal(h, VOCAB, std=0.01)
        p["bout"] = np.zeros(VOCAB, np.float32)
    else:
        raise ValueError(f"unknown architecture {arch.kind!r}")
    return p


def _rms(h: F32) -> tuple[F32, F32]:
    r = 1.0 / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + np.float32(RMS_EPS))
    r = r.astype(h.dtype, copy=False)
    return h * r, r


def _rms_back(dn: Any, h: Any, r: Any) -> Any:
    """Gradient of ``n = h * r(h)`` with ``r = 1/sqrt(mean(h^2) + eps)``."""
    return r * dn - h * (r**3) * np.mean(dn * h, axis=1, keepdims=True)


def logits(arch: Arch, p: Params, ctx: npt.NDArray[np.intp], quant: Quant = _identity,
           cache: dict[str, Any] | None = None) -> F32:
    """Forward pass to next-byte logits; fills ``cache`` for the backward pass when given.

    Works in the parameters' dtype: float32 in training, float64 in the gradient check.
    """
    b = ctx.shape[0]
    x = quant(p["E"][ctx].reshape(b, arch.n_in))
    c: dict[str, Any] = {"x": x, "ctx": ctx}
    if arch.kind in ("mlp", "hybrid"):
        hid = quant(np.tanh(x @ p["W1"] + p["b1"]))
        z = hid @ p["W2"] + p["b2"]
        if arch.kind == "hybrid":
            z = z + p["G"][ctx[:, -1]]
        c["h"] = hid
    else:
        h = quant(x @ p["Win"] + p["bin"])
        for k in range(arch.blocks):
            n, r = _rms(h)
            u = quant(np.tanh(n @ p[f"Wa{k}"] + p[f"ba{k}"]))
            c[f"blk{k}"] = (h, n, r, u)
            h = quant(h + u @ p[f"Wb{k}"])
        n, r = _rms(h)
        c["out"] = (h, n, r)
        z = n @ p["Wout"] + p["bout"]
    z = quant(z.astype(p["E"].dtype, copy=False))
    if cache is not None:
        cache.update(c)
    return z


def cross_entropy(z: F32, targets: npt.NDArray[np.intp]) -> tuple[float, F32]:
    """Mean cross-entropy in nats and the softmax probabilities (for the gradient)."""
    z64 = z.astype(np.float64)
    m = z64.max(axis=1, keepdims=True)
    e = np.exp(z64 - m)
    s = e.sum(axis=1, keepdims=True)
    lse = np.log(s) + m
    loss = float(np.mean(lse[:, 0] - z64[np.arange(z.shape[0]), targets]))
    return loss, (e / s).astype(z.dtype)


def loss_and_grads(arch: Arch, p: Params, ctx: npt.NDArray[np.intp],
                   targets: npt.NDArray[np.intp], quant: Quant = _identity
                   ) -> tuple[float, Params]:
    """Mean cross-entropy (nats) of a batch and its gradient for every parameter."""
    cache: dict[str, Any] = {}
    z = logits(arch, p, ctx, quant, cache)
    loss, probs = cross_entropy(z, targets)
    b = ctx.shape[0]
    dz = probs
    dz[np.arange(b), targets] -= 1.0
    dz /= b
    g: dict[str, Any] = {}
    x = cache["x"]
    dx: Any
    if arch.kind in ("mlp", "hybrid"):
        hid = cache["h"]
        g["W2"] = hid.T @ dz
        g["b2"] = dz.sum(axis=0)
        if arch.kind == "hybrid":
            g["G"] = _scatter_rows(ctx[:, -1], dz)
        dpre = (dz @ p["W2"].T) * (1.0 - hid * hid)
        g["W1"] = x.T @ dpre
        g["b1"] = dpre.sum(axis=0)
        dx = dpre @ p["W1"].T
    else:
        h, n, r = cache["out"]
        g["Wout"] = n.T @ dz
        g["bout"] = dz.sum(axis=0)
        dh = _rms_back(dz @ p["Wout"].T, h, r)
        for k in reversed(range(arch.blocks)):
            h, n, r, u = cache[f"blk{k}"]
            g[f"Wb{k}"] = u.T @ dh
            dpre = (dh @ p[f"Wb{k}"].T) * (1.0 - u * u)
            g[f"Wa{k}"] = n.T @ dpre
            g[f"ba{k}"] = dpre.sum(axis=0)
            dh = dh + _rms_back(dpre @ p[f"Wa{k}"].T, h, r)
        g["Win"] = x.T @ dh
        g["bin"] = dh.sum(axis=0)
        dx = dh @ p["Win"].T
    g["E"] = _scatter_rows(ctx.reshape(-1), dx.reshape(-1, arch.embed))
    return loss, {k: v.astype(p["E"].dtype, copy=False) for k, v in g.items()}


def _scatter_rows(rows: npt.NDArray[np.intp], values: Any) -> F32:
    """Sum ``values`` into a (256, width) table by row index (embedding and bigram grads).

    A one-hot matrix product: much faster than ``np.add.at`` at these sizes.
    """
    onehot = np.zeros((VOCAB, rows.size), values.dtype)
    onehot[rows, np.arange(rows.size)] = 1.0
    out: F32 = onehot @ values
    return out
