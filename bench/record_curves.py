"""Record real validation-BPB curves from the reference trainer for the backtest.

Run by hand: ``.venv/bin/python bench/record_curves.py [--steps 4000] [--out PATH]``.
Each configuration is a canon-named variant trained with several seeds, exactly as a race
would run it (``spec.trainer_variables`` builds the settings). Writes a CSV with columns
``group,run,step,value`` (group = the variant, run = the canon name, value = BPB) and prints
a JSON summary (final BPB and CPU seconds per run).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from gardener.core.canon import parse  # noqa: E402
from gardener.trainer.spec import load_models_config, trainer_variables  # noqa: E402
from gardener.trainer.train import resolve_config, run, tune_malloc  # noqa: E402

VARIANTS = (
    "IGLA-HYBRID-FP32-BASE",
    "IGLA-HYBRID-FP32-WSD",
    "IGLA-TRAIN_V2-FP32-BASE",
    "IGLA-TRAIN_V2-GF16-WSD",
    "IGLA-JEPA-T-BF16-BS8-GRADFIX",
    "IGLA-NCA-FP32-EMA10",
    "IGLA-PHI-FP8E4M3-BASE",
    "IGLA-PHI-DLFLOAT-WSD",
)
SEEDS = (43, 44, 45)
LINE = re.compile(r"^step=(\d+) BPB=(\S+)$")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "curves" / "trainer_curves.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--first-exp-id", type=int, default=901, help="EXP_ID of the first run")
    args = ap.parse_args()
    tune_malloc()
    models = load_models_config()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    exp_id = args.first_exp_id - 1
    with args.out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "run", "step", "value"])
        for variant in args.variants.split(","):
            for seed in map(int, args.seeds.split(",")):
                exp_id += 1
                canon = parse(f"{variant}-E{exp_id:04d}-seed{seed}")
                env = trainer_variables(canon, steps=args.steps, corpus=None, models=models)
                env["TRAIN_EVAL_EVERY"] = str(args.eval_every)
                lines: list[str] = []
                t = time.process_time()
                bpb = run(resolve_config(env, []), lines.append)
                cpu = time.process_time() - t
                for line in lines:
                    if m := LINE.match(line):
                        writer.writerow([canon.variant, str(canon), m.group(1), m.group(2)])
                fh.flush()
                summary.append({"run": str(canon), "final_bpb": round(bpb, 4),
                                "cpu_s": round(cpu, 1)})
                print(json.dumps(summary[-1]), flush=True)
    print(json.dumps({"out": str(args.out), "steps": args.steps, "runs": len(summary),
                      "cpu_s": round(sum(r["cpu_s"] for r in summary), 1)}))


if __name__ == "__main__":
    main()
