"""Pangeo-style climatology and anomalies on rankmesh, checked against Dask's threaded scheduler.

Synthetic daily surface temperature on a 1-degree grid, (time, lat=180, lon=360) float32:
a seasonal cycle plus Gaussian noise, chunked in time. The job computes the daily
climatology (mean per day of year), the anomalies against it, and the cos(lat)-weighted
global mean anomaly per day. It runs the same graph twice, on a
`rankmesh.LocalCluster(n_workers=2, threads_per_worker=1)` and on Dask's threaded
scheduler (num_workers=2), prints both results, both wall times, and fails (exit 1) when
the two results differ by more than 1e-6 of the result's scale.

The only rankmesh-specific lines are the two that start the cluster and the client:
inside `with rankmesh.Client(cluster):`, a plain `.compute()` runs on rankmesh.

Import `synthetic_dataset` and `anomaly_pipeline` from here (tests and bench/ put the
examples/ folder on sys.path).
"""

from __future__ import annotations

import argparse
import sys
import time

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

LAT, LON = 180, 360
# Spatial chunks: a quarter of the globe each, as in the Dask anchor benchmark.
CHUNK_LAT, CHUNK_LON = 90, 180
RELATIVE_TOLERANCE = 1e-6
WARMUP_DAYS = 30


def synthetic_dataset(days: int, chunk_days: int = 365, seed: int = 0) -> xr.Dataset:
    """Lazy dataset with one variable `t` (time, lat, lon) float32, daily from 2000-01-01.

    The same arguments always give the same values, whichever scheduler computes them:
    the random generator is seeded per chunk when the graph is built.
    """
    time_index = pd.date_range("2000-01-01", periods=days, freq="D")
    lat = np.linspace(-89.5, 89.5, LAT)
    lon = np.linspace(0.5, 359.5, LON)
    noise = da.random.default_rng(seed).standard_normal(
        (days, LAT, LON), chunks=(chunk_days, CHUNK_LAT, CHUNK_LON), dtype=np.float32
    )
    day_of_year = time_index.day_of_year.values.astype(np.float32)
    seasonal = 10.0 * np.sin(2 * np.pi * day_of_year / 365.25).astype(np.float32)
    temperature = xr.DataArray(
        noise, dims=("time", "lat", "lon"), coords={"time": time_index, "lat": lat, "lon": lon}
    )
    temperature = temperature + xr.DataArray(seasonal, dims="time", coords={"time": time_index})
    return xr.Dataset({"t": temperature})


def anomaly_pipeline(ds: xr.Dataset) -> xr.DataArray:
    """Lazy global-mean anomaly series: daily climatology, anomalies, cos(lat)-weighted mean."""
    by_day = ds["t"].groupby("time.dayofyear")
    climatology = by_day.mean("time")
    anomalies = by_day - climatology
    weights = np.cos(np.deg2rad(ds["lat"]))
    return anomalies.weighted(weights).mean(("lat", "lon"))


def timed_compute(args: argparse.Namespace, **compute_kwargs) -> tuple[np.ndarray, float]:
    """Computes a small warm-up job (imports, connections), then the timed one."""
    anomaly_pipeline(synthetic_dataset(WARMUP_DAYS, args.chunk_days, args.seed)).compute(
        **compute_kwargs
    )
    series = anomaly_pipeline(synthetic_dataset(args.days, args.chunk_days, args.seed))
    start = time.perf_counter()
    values = series.compute(**compute_kwargs).values
    return values, time.perf_counter() - start


def run_on_rankmesh(args: argparse.Namespace) -> tuple[np.ndarray, float]:
    import rankmesh

    start = time.perf_counter()
    with rankmesh.LocalCluster(n_workers=args.workers, threads_per_worker=1) as cluster:
        print(f"rankmesh cluster up in {time.perf_counter() - start:.2f} s")
        # Inside this block rankmesh is Dask's default scheduler.
        with rankmesh.Client(cluster):
            return timed_compute(args)


def run_on_threads(args: argparse.Namespace) -> tuple[np.ndarray, float]:
    return timed_compute(args, scheduler="threads", num_workers=args.workers)


def describe(name: str, values: np.ndarray, wall_s: float) -> None:
    head = ", ".join(f"{v:+.5f}" for v in values[:4])
    print(
        f"{name:>8}: {wall_s:7.2f} s   {len(values)} days   first [{head}, ...]   "
        f"min {values.min():+.5f}  max {values.max():+.5f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=730, help="length of the time axis")
    parser.add_argument("--chunk-days", type=int, default=365, help="days per chunk")
    parser.add_argument("--workers", type=int, default=2, help="workers (threads for Dask)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedulers",
        default="rankmesh,threads",
        help="comma-separated subset of rankmesh,threads (results are compared when both run)",
    )
    args = parser.parse_args()
    schedulers = [s for s in args.schedulers.split(",") if s]
    runners = {"rankmesh": run_on_rankmesh, "threads": run_on_threads}
    unknown = set(schedulers) - set(runners)
    if unknown:
        parser.error(f"unknown scheduler(s): {', '.join(sorted(unknown))}")

    graph = anomaly_pipeline(synthetic_dataset(args.days, args.chunk_days, args.seed))
    print(
        f"input ({args.days}, {LAT}, {LON}) float32 = {args.days * LAT * LON * 4 / 1e9:.2f} GB, "
        f"{len(graph.__dask_graph__())} tasks, {args.workers} workers"
    )

    results = {}
    for name in schedulers:
        results[name] = runners[name](args)
        describe(name, *results[name])

    if len(results) < 2:
        return 0
    (rankmesh_values, rankmesh_wall), (threads_values, threads_wall) = (
        results["rankmesh"],
        results["threads"],
    )
    difference = float(np.max(np.abs(rankmesh_values - threads_values)))
    scale = float(np.max(np.abs(threads_values)))
    print(
        f"max |rankmesh - threads| = {difference:.3g} (scale {scale:.3g}); "
        f"wall rankmesh / threads = {rankmesh_wall / threads_wall:.2f}"
    )
    if difference > RELATIVE_TOLERANCE * scale:
        print("FAILED: the schedulers disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
