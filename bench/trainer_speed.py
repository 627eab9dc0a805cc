"""Training speed of the reference trainer: steps per second per model, hidden size, format.

Run by hand: ``.venv/bin/python bench/trainer_speed.py [--steps N]``; prints one JSON object.
CPU time in-process with one BLAS thread (as ``python -m gardener.trainer`` runs), evaluation
every 10 steps included, corpus loading excluded (reported separately). Numbers depend on
the machine's load: report them with the load they were measured under.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from gardener.trainer import data  # noqa: E402
from gardener.trainer.train import resolve_config, run, tune_malloc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--models", default="HYBRID,TRAIN_V2,JEPA-T,NCA,PHI")
    ap.add_argument("--hidden", default="256,512,768")
    ap.add_argument("--formats", default="FP32,GF16,BF16,FP8E4M3")
    args = ap.parse_args()
    tune_malloc()
    t0 = time.perf_counter()
    corpus = data.load_corpus(None)
    load_s = time.perf_counter() - t0
    data.load_corpus = lambda spec=None, cap=data.DEFAULT_CAP: corpus  # type: ignore[assignment]
    results = []
    for model in args.models.split(","):
        for hidden in args.hidden.split(","):
            for fmt in args.formats.split(","):
                if fmt != "FP32" and hidden != "256":
                    continue  # formats are measured at the smoke race's size
                cfg = resolve_config({"TRAIN_MODEL": model, "TRAIN_HIDDEN": hidden,
                                      "TRAIN_FORMAT": fmt, "TRAIN_STEPS": str(args.steps)}, [])
                t = time.process_time()
                bpb = run(cfg, lambda _line: None)
                dt = time.process_time() - t
                results.append({"model": model, "arch": cfg.arch.kind, "hidden": int(hidden),
                                "format": fmt, "steps": args.steps,
                                "steps_per_s": round(args.steps / dt, 1),
                                "final_bpb": round(bpb, 4)})
    print(json.dumps({"corpus_load_s": round(load_s, 3), "corpus_bytes": len(corpus.data),
                      "load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
