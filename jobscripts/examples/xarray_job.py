"""The xarray climatology/anomaly pipeline (examples/xarray_anomaly.py) as a batch job:
nothing rankmesh-specific in it; inside `rankmesh submit`, `.compute()` runs on the job's
cluster. Saves the global-mean anomaly series to OUTPUT (.npy).

    rankmesh submit --ntasks-per-node 3 --walltime 10 jobscripts/examples/xarray_job.py out.npy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# The pipeline lives in the repository's examples/ folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from xarray_anomaly import anomaly_pipeline, synthetic_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", help="where to save the result (.npy)")
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--chunk-days", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    ds = synthetic_dataset(days=args.days, chunk_days=args.chunk_days, seed=args.seed)
    result = anomaly_pipeline(ds).compute()
    np.save(args.output, result.values)
    print(f"saved {result.sizes['time']} days to {args.output}")


if __name__ == "__main__":
    main()
