"""``python -m gardener.trainer``: one BLAS thread (many trainers share few cores), then train."""

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

from gardener.trainer.train import main, tune_malloc  # noqa: E402  (after the thread settings)

tune_malloc()
sys.exit(main())
