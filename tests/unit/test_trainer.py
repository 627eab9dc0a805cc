"""The reference trainer: gradients, determinism, output contract, L-R9, corpus, learning."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gardener.trainer import data
from gardener.trainer.model import Arch, init_params, loss_and_grads
from gardener.trainer.train import format_bpb, lr_at, resolve_config

BPB_LINE = re.compile(r"^step=(\d+) BPB=(\d\.\d{4})$")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 KB of real Python source (the first stdlib files), as a single file."""
    files = data._stdlib_files()
    text = data._read_capped(files, 200_000)
    path = tmp_path_factory.mktemp("corpus") / "small.py"
    path.write_bytes(text)
    return path


def _train(env: dict[str, str], argv: list[str] | None = None) -> tuple[list[str], float]:
    """Run ``python -m gardener.trainer`` as the backends do (one BLAS thread: in-process,
    pytest's multi-threaded BLAS is many times slower on a loaded machine). 256 validation
    windows instead of 1024 keep the tests fast."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAIN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gardener.trainer", "--eval-size", "256", *(argv or [])],
        env={**base, "PYTHONPATH": str(REPO), **env}, cwd=REPO, capture_output=True,
        text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return lines, float(lines[-1].removeprefix("DONE: bpb="))


@pytest.mark.parametrize("kind,blocks", [("mlp", 1), ("resmlp", 2), ("hybrid", 1)])
def test_gradients_match_finite_differences(kind: str, blocks: int):
    arch = Arch(kind, hidden=12, context=3, embed=4, blocks=blocks)
    rng = np.random.default_rng(0)
    p = {k: v.astype(np.float64) for k, v in init_params(arch, rng).items()}
    for k in p:  # non-trivial values everywhere (output layers and G start at/near zero)
        p[k] = p[k] + rng.standard_normal(p[k].shape) * 0.3
    ctx = rng.integers(0, 256, size=(5, arch.context)).astype(np.intp)
    ctx[1, -1] = ctx[0, -1]  # a repeated byte exercises the scatter-add of the tables
    tgt = rng.integers(0, 256, size=5).astype(np.intp)
    _, grads = loss_and_grads(arch, p, ctx, tgt)
    assert set(grads) == set(p)
    eps = 1e-6
    for name, w in p.items():
        flat_idx = rng.choice(w.size, size=min(6, w.size), replace=False)
        if name in ("E", "G"):  # rows that are actually used
            used = ctx.reshape(-1) if name == "E" else ctx[:, -1]
            flat_idx = np.ravel_multi_index((used[:3], np.zeros(3, dtype=int)), w.shape)
        for i in flat_idx:
            orig = w.flat[i]
            w.flat[i] = orig + eps
            up, _ = loss_and_grads(arch, p, ctx, tgt)
            w.flat[i] = orig - eps
            down, _ = loss_and_grads(arch, p, ctx, tgt)
            w.flat[i] = orig
            numeric = (up - down) / (2 * eps)
            assert grads[name].flat[i] == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_output_contract_and_learning(small_corpus: Path):
    env = {"TRAIN_CORPUS": str(small_corpus), "TRAIN_STEPS": "200", "TRAIN_SEED": "3"}
    lines, bpb = _train(env)
    want_sha = hashlib.sha256(small_corpus.read_bytes()).hexdigest()
    assert lines[0] == f"corpus=small.py sha256={want_sha}"
    steps = [int(m.group(1)) for ln in lines if (m := BPB_LINE.match(ln))]
    assert steps == list(range(10, 201, 10))
    values = [float(ln.split("BPB=")[1]) for ln in lines if BPB_LINE.match(ln)]
    assert lines[-1] == f"DONE: bpb={bpb:.4f}" and values[-1] == pytest.approx(bpb, abs=1e-4)
    assert values[0] < 8.0 and bpb < values[0] - 1.0 and bpb > 1.89  # learning, not leaking
    assert all(ln.startswith(("corpus=", "config ", "step=", "DONE:")) for ln in lines)


def test_same_seed_same_curve_other_seed_other_curve(small_corpus: Path):
    env = {"TRAIN_CORPUS": str(small_corpus), "TRAIN_STEPS": "40", "TRAIN_MODEL": "TRAIN_V2",
           "TRAIN_HIDDEN": "64"}
    a, _ = _train({**env, "TRAIN_SEED": "7"})
    b, _ = _train({**env, "TRAIN_SEED": "7"})
    c, _ = _train({**env, "TRAIN_SEED": "8"})
    assert a == b
    assert [x for x in a if x.startswith("step=")] != [x for x in c if x.startswith("step=")]


def test_canon_name_sets_everything(small_corpus: Path):
    env = {"TRAIN_CANON_NAME": "IGLA-JEPA-T-BF16-WSD-BS8-EMA10-GRADFIX-h256-E0042-seed11",
           "TRAIN_CORPUS": str(small_corpus)}
    cfg = resolve_config(env, ["--steps", "30"])
    assert (cfg.model, cfg.format, cfg.seed, cfg.steps) == ("JEPA-T", "BF16", 11, 30)
    assert (cfg.schedule, cfg.batch, cfg.arch.hidden, cfg.exp_id) == ("wsd", 8, 256, "0042")
    assert cfg.ema == pytest.approx(0.9) and cfg.grad_clip == 1.0
    # explicit variables win over what the name implies, flags over variables
    cfg2 = resolve_config({**env, "TRAIN_BATCH": "16"}, ["--batch", "4"])
    assert cfg2.batch == 4
    lines, bpb = _train(env, ["--steps", "30"])
    assert math.isfinite(bpb) and sum(bool(BPB_LINE.match(x)) for x in lines) == 3


FORMAT_ENV = {"TRAIN_STEPS": "30", "TRAIN_HIDDEN": "256", "TRAIN_SEED": "5",
              "TRAIN_MODEL": "JEPA-T"}


@pytest.fixture(scope="module")
def fp32_reference(small_corpus: Path) -> list[str]:
    lines, _ = _train({**FORMAT_ENV, "TRAIN_CORPUS": str(small_corpus), "TRAIN_FORMAT": "FP32"})
    return [x for x in lines if x.startswith("step=")]


@pytest.mark.parametrize("fmt", ["GF16", "BF16", "DLFLOAT", "FP8E4M3", "FP8E5M2"])
def test_formats_train_and_differ_from_fp32(fmt: str, small_corpus: Path,
                                            fp32_reference: list[str]):
    lines, bpb = _train({**FORMAT_ENV, "TRAIN_CORPUS": str(small_corpus), "TRAIN_FORMAT": fmt})
    assert math.isfinite(bpb) and bpb < 7.5
    assert [x for x in lines if x.startswith("step=")] != fp32_reference
    assert f"format={fmt}" in lines[1]


def test_lr9_refused_in_process_and_by_the_module(small_corpus: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    from gardener.trainer.train import main

    code = main([], {"TRAIN_FORMAT": "GF16", "TRAIN_HIDDEN": "128",
                     "TRAIN_CORPUS": str(small_corpus)})
    err = capsys.readouterr()
    assert code != 0 and err.out == ""
    assert err.err.count("\n") == 1 and "L-R9" in err.err
    code = main(["--hidden", "128"], {"TRAIN_CANON_NAME": "IGLA-NCA-GF16-SMOKE-seed501"})
    assert code != 0 and "L-R9" in capsys.readouterr().err


def test_module_entry_point_runs(small_corpus: Path):
    env = {**os.environ, "TRAIN_CORPUS": str(small_corpus), "TRAIN_STEPS": "20",
           "TRAIN_CANON_NAME": "IGLA-PHI-FP32-SMOKE-seed2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "gardener.trainer"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("corpus=small.py sha256=")
    assert [ln for ln in out if BPB_LINE.match(ln)] and out[-1].startswith("DONE: bpb=")
    bad = subprocess.run([sys.executable, "-m", "gardener.trainer", "--format", "GF16",
                          "--hidden", "64"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_corpus_folder_file_and_split(tmp_path: Path, small_corpus: Path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"b" * 40_000)
    (folder / "sub" / "a.txt").write_bytes(b"a" * 40_000)
    (folder / ".hidden").write_bytes(b"x" * 1000)
    c = data.load_corpus(str(folder))
    assert c.name == "books"
    assert c.data == b"b" * 40_000 + b"a" * 40_000  # sorted by relative path, hidden skipped
    assert c.sha256 == hashlib.sha256(c.data).hexdigest()
    capped = data.load_corpus(str(small_corpus), cap=100_000)
    assert len(capped.data) == 100_000
    train, val = data.split(data.load_corpus(str(small_corpus)))
    assert train.size + val.size == small_corpus.stat().st_size
    assert val.size > 0.05 * (train.size + val.size)
    assert data.describe(None) == (data.load_corpus(None).name, data.load_corpus(None).sha256)
    with pytest.raises(FileNotFoundError):
        data.load_corpus(str(tmp_path / "missing"))


def test_schedules():
    cfg = resolve_config({}, ["--steps", "1000", "--schedule", "wsd", "--lr", "0.01"])
    assert lr_at(1, cfg) == pytest.approx(0.01 / 50)
    assert lr_at(500, cfg) == lr_at(800, cfg) == 0.01
    assert lr_at(900, cfg) == pytest.approx(0.005) and lr_at(1000, cfg) == 0.0
    cos = resolve_config({}, ["--steps", "1000", "--schedule", "cosine", "--lr", "0.01"])
    assert lr_at(1000, cos) == pytest.approx(0.001) and lr_at(100, cos) < 0.01
    const = resolve_config({}, ["--steps", "1000", "--schedule", "constant", "--lr", "0.01"])
    assert lr_at(999, const) == 0.01


def test_bpb_formatting():
    assert format_bpb(2.34567) == "2.3457"
    assert format_bpb(float("nan")) == "nan"
    assert format_bpb(12.5) == "12.5000"  # printed honestly; L-R8 rejects it downstream
