"""The training loop: settings from TRAIN_* variables (or flags), AdamW, schedules, BPB lines.

Settings are resolved in this order, later wins: models.toml defaults for the model, what
the canon name in TRAIN_CANON_NAME implies (``spec.trainer_variables``), the TRAIN_*
environment, command-line flags. Output, flushed line by line (and posted to the gardener's
``/v1/samples`` when ``GARDENER_INGEST_URL`` and ``GARDENER_INGEST_TOKEN`` are set, see
``post.py``):
  corpus=NAME sha256=HEX            first line, for the gardener's corpus tripwire
  step=N BPB=X.XXXX                 every eval_every steps (and at the last step)
  DONE: bpb=X.XXXX                  the final validation BPB
A non-finite BPB is printed as it is (``BPB=nan``) and the run stops with exit code 1.
The run is a pure function of its settings and the corpus bytes: same seed, same curve.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gardener.core.canon import CanonName, check_gf16_hidden, parse
from gardener.core.formats import FORMAT_NAMES, round_to
from gardener.errors import GF16HiddenTooSmall, UserError
from gardener.trainer import data as corpus_data
from gardener.trainer.model import Arch, Params, cross_entropy, init_params, logits
from gardener.trainer.model import loss_and_grads as model_loss_and_grads
from gardener.trainer.spec import (
    SCHEDULES,
    VARIABLES,
    ModelsConfig,
    load_models_config,
    trainer_variables,
)

F32 = npt.NDArray[np.float32]
LN2 = math.log(2.0)
EVAL_SIZE = 1024  # fixed validation windows, the same for every seed
EVAL_SEED = 20_240_601
DEFAULT_STEPS = 500


@dataclass(frozen=True)
class TrainConfig:
    model: str
    arch: Arch
    format: str
    seed: int
    steps: int
    lr: float
    schedule: str
    batch: int
    ema: float
    grad_clip: float
    corpus: str | None
    eval_every: int
    canon_name: str = ""
    exp_id: str = ""
    weight_decay: float = 0.0
    eval_size: int = EVAL_SIZE

    def describe(self) -> str:
        a = self.arch
        return (f"config model={self.model} arch={a.kind} format={self.format} hidden={a.hidden} "
                f"context={a.context} embed={a.embed} blocks={a.blocks} lr={self.lr:g} "
                f"schedule={self.schedule} batch={self.batch} ema={self.ema:g} "
                f"grad_clip={self.grad_clip:g} steps={self.steps} seed={self.seed}")


def _flag_name(var: str) -> str:
    return "--" + var.removeprefix("TRAIN_").lower().replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m gardener.trainer",
        description="Train a small numpy byte-level LM and print validation BPB. Every flag "
        "overrides the TRAIN_* variable of the same name.",
    )
    for var in VARIABLES:
        ap.add_argument(_flag_name(var), dest=var, default=None, help=f"overrides {var}")
    ap.add_argument("--models-config", default=None, help="path to models.toml")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled decay")
    ap.add_argument("--eval-size", type=int, default=EVAL_SIZE, help="validation windows")
    return ap


def resolve_config(env: Mapping[str, str], argv: Sequence[str] | None = None,
                   models: ModelsConfig | None = None) -> TrainConfig:
    """Merge models.toml, the canon name, the environment and the flags into one config."""
    args = build_parser().parse_args(argv)
    models = models or load_models_config(args.models_config)
    given = {v: env[v] for v in VARIABLES if env.get(v)}
    given.update({v: getattr(args, v) for v in VARIABLES if getattr(args, v) is not None})
    vals: dict[str, str] = {}
    canon: CanonName | None = None
    if given.get("TRAIN_CANON_NAME"):
        canon = parse(given["TRAIN_CANON_NAME"], models=tuple(models.models))
        steps0 = int(given.get("TRAIN_STEPS", DEFAULT_STEPS))
        vals = trainer_variables(canon, steps=steps0, corpus=given.get("TRAIN_CORPUS"),
                                 models=models)
    model = given.get("TRAIN_MODEL", vals.get("TRAIN_MODEL", "HYBRID"))
    spec = models.model(model)
    base = {
        "TRAIN_FORMAT": "FP32", "TRAIN_SEED": "0", "TRAIN_STEPS": str(DEFAULT_STEPS),
        "TRAIN_HIDDEN": str(spec.hidden), "TRAIN_LR": repr(spec.lr),
        "TRAIN_SCHEDULE": models.schedule, "TRAIN_BATCH": str(models.batch),
        "TRAIN_EMA": repr(models.ema), "TRAIN_GRAD_CLIP": repr(models.grad_clip),
        "TRAIN_CORPUS": "stdlib", "TRAIN_EVAL_EVERY": str(models.eval_every),
        "TRAIN_EXP_ID": "", "TRAIN_CANON_NAME": "",
    }
    merged = {**base, **vals, **given}
    try:
        cfg = TrainConfig(
            model=model,
            arch=Arch(spec.arch, int(merged["TRAIN_HIDDEN"]), spec.context, spec.embed,
                      spec.blocks),
            format=merged["TRAIN_FORMAT"].upper(),
            seed=int(merged["TRAIN_SEED"]),
            steps=int(merged["TRAIN_STEPS"]),
            lr=float(merged["TRAIN_LR"]),
            schedule=merged["TRAIN_SCHEDULE"].lower(),
            batch=int(merged["TRAIN_BATCH"]),
            ema=float(merged["TRAIN_EMA"]),
            grad_clip=float(merged["TRAIN_GRAD_CLIP"]),
            corpus=merged["TRAIN_CORPUS"] or None,
            eval_every=int(merged["TRAIN_EVAL_EVERY"]),
            canon_name=merged["TRAIN_CANON_NAME"],
            exp_id=merged["TRAIN_EXP_ID"],
            weight_decay=args.weight_decay,
            eval_size=args.eval_size,
        )
    except ValueError as exc:
        raise UserError(f"bad trainer setting: {exc}") from None
    _validate(cfg, canon)
    return cfg


def _validate(cfg: TrainConfig, canon: CanonName | None) -> None:
    if cfg.format not in FORMAT_NAMES:
        raise UserError(f"TRAIN_FORMAT {cfg.format!r} not one of {', '.join(FORMAT_NAMES)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"TRAIN_SCHEDULE {cfg.schedule!r} not one of {', '.join(SCHEDULES)}")
    if min(cfg.steps, cfg.batch, cfg.eval_every, cfg.arch.hidden, cfg.eval_size) < 1:
        raise UserError("steps, batch, eval_every, hidden and eval size must be >= 1")
    if not (0.0 <= cfg.ema < 1.0) or cfg.grad_clip < 0 or cfg.lr <= 0:
        raise UserError("need 0 <= TRAIN_EMA < 1, TRAIN_GRAD_CLIP >= 0, TRAIN_LR > 0")
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"TRAIN_SEED {cfg.seed} outside [0, 2^32)")
    # L-R9, checked against the settings actually used (a flag may change the hidden size).
    if canon is not None:
        effective = CanonName(canon.model, cfg.format, canon.tags, canon.seed, canon.exp_id,
                              canon.models)
        check_gf16_hidden(effective, cfg.arch.hidden)
    elif cfg.format == "GF16" and cfg.arch.hidden < 256:
        raise GF16HiddenTooSmall(f"L-R9: GF16 needs hidden size h >= 256, got h={cfg.arch.hidden}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 1-based ``step``: linear warmup, then constant, cosine or WSD.

    cosine decays to 10% of the peak at the last step; WSD holds the peak and decays linearly
    to zero over the last 20% of the steps (so its curve drops sharply at the end).
    """
    warmup = min(100, max(1, cfg.steps // 20))
    if step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        frac = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    decay = max(1, cfg.steps // 5)
    start = cfg.steps - decay
    if step <= start:
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / decay


class FlatParams:
    """All parameters in one float32 vector (views per name): AdamW and EMA in a few ops."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.cumsum([0, *sizes])
        self.flat = np.concatenate([params[n].ravel() for n in self.names]).astype(np.float32)
        self.matrix = np.concatenate([np.full(sz, len(sh) == 2 and n != "E", dtype=bool)
                                      for n, sh, sz in zip(self.names, self.shapes, sizes,
                                                           strict=True)])

    def views(self, flat: F32) -> Params:
        return {n: flat[self.offsets[i]: self.offsets[i + 1]].reshape(self.shapes[i])
                for i, n in enumerate(self.names)}

    def pack(self, grads: Params, out: F32) -> F32:
        for i, n in enumerate(self.names):
            out[self.offsets[i]: self.offsets[i + 1]] = grads[n].ravel()
        return out


def make_quant(fmt: str) -> Callable[[F32], F32] | None:
    if fmt == "FP32":
        return None

    def quant(x: F32) -> F32:
        return round_to(x, fmt)

    return quant


def evaluate(arch: Arch, params: Params, ctx: npt.NDArray[np.intp],
             targets: npt.NDArray[np.intp], quant: Callable[[F32], F32] | None) -> float:
    """Validation cross-entropy in bits per byte on the fixed validation windows."""
    if quant is None:
        z = logits(arch, params, ctx)
    else:
        z = logits(arch, params, ctx, quant)
    with np.errstate(all="ignore"):
        loss, _ = cross_entropy(z, targets)
    return loss / LN2


def format_bpb(bpb: float) -> str:
    """Four decimals, the honest way: ``2.3456``, ``10.1234`` or ``nan`` (L-R8 judges it)."""
    return "nan" if math.isnan(bpb) else f"{bpb:.4f}"


def run(cfg: TrainConfig, out: Callable[[str], None]) -> float:
    """Train, calling ``out`` with each output line; returns the final validation BPB."""
    corpus = corpus_data.load_corpus(cfg.corpus)
    out(corpus.header())
    out(cfg.describe())
    train, val = corpus_data.split(corpus)
    arch = cfg.arch
    rng = np.random.default_rng(cfg.seed)
    eval_rng = np.random.default_rng(EVAL_SEED)
    n_eval = min(cfg.eval_size, val.size - arch.context - 1)
    eval_ctx, eval_tgt = corpus_data.windows(
        val, np.sort(eval_rng.choice(val.size - arch.context - 1, n_eval, replace=False)),
        arch.context)
    fp = FlatParams(init_params(arch, rng))
    quant = make_quant(cfg.format)
    theta = fp.flat
    grad = np.zeros_like(theta)
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    ema = theta.copy() if cfg.ema > 0 else None
    b1, b2, eps = 0.9, 0.99, 1e-8
    high = train.size - arch.context - 1
    bpb = float("nan")
    for step in range(1, cfg.steps + 1):
        starts = rng.integers(0, high, size=cfg.batch)
        ctx, tgt = corpus_data.windows(train, starts, arch.context)
        used = theta if quant is None else quant(theta)
        if quant is None:
            loss, grads = model_loss_and_grads(arch, fp.views(used), ctx, tgt)
        else:
            loss, grads = model_loss_and_grads(arch, fp.views(used), ctx, tgt, quant)
        g = fp.pack(grads, grad)
        if cfg.grad_clip > 0:
            norm = float(np.sqrt(np.dot(g, g)))
            if norm > cfg.grad_clip:
                g *= np.float32(cfg.grad_clip / norm)
        lr = lr_at(step, cfg)
        m1 *= np.float32(b1)
        m1 += np.float32(1 - b1) * g
        m2 *= np.float32(b2)
        m2 += np.float32(1 - b2) * (g * g)
        corr = math.sqrt(1 - b2**step) / (1 - b1**step)
        if cfg.weight_decay > 0:
            theta -= np.float32(lr * cfg.weight_decay) * theta * fp.matrix
        theta -= np.float32(lr * corr) * m1 / (np.sqrt(m2) + np.float32(eps))
        if ema is not None:
            ema *= np.float32(cfg.ema)
            ema += np.float32(1 - cfg.ema) * theta
        if step % cfg.eval_every == 0 or step == cfg.steps or not math.isfinite(loss):
            w = theta if ema is None else ema
            w = w if quant is None else quant(w)
            bpb = evaluate(arch, fp.views(w), eval_ctx, eval_tgt, quant)
            out(f"step={step} BPB={format_bpb(bpb)}")
            if not math.isfinite(bpb):
                break
    out(f"DONE: bpb={format_bpb(bpb)}")
    return bpb


def tune_malloc() -> None:
    """Keep large temporaries in the heap (glibc only; elsewhere nothing changes).

    By default glibc hands every array above 128 KiB back to the kernel when freed and
    page-faults it in again on the next step: a several-fold slowdown of this loop.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 29)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``python -m gardener.trainer``; user errors are one line on stderr."""
    import os

    from gardener.trainer.post import SamplePoster

    environ = os.environ if env is None else env
    poster = SamplePoster.from_env(environ)

    def out(line: str) -> None:
        print(line, flush=True)  # always: the log is the fallback of the HTTP path
        if poster is not None:
            poster.add(line)

    try:
        cfg = resolve_config(environ, argv)
        try:
            bpb = run(cfg, out)
        finally:
            if poster is not None:
                poster.close()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if math.isfinite(bpb) else 1
