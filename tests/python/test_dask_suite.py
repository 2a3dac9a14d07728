"""A fixed selection of Dask's own tests, every computation on a rankmesh cluster.

The selection runs in a pytest subprocess with the routing plugin (tests/python/dask_suite/
plugin.py) in rankmesh mode; each test must pass and must have sent at least one
computation to the cluster, so the test fails if rankmesh breaks them or if the routing
stops routing. The full comparison with `distributed` is scripts/dask-suite.sh.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dask

ROOT = Path(__file__).resolve().parents[2]
DASK = Path(dask.__file__).parent

# Tests that pass on rankmesh and compute something, across the six modules of the full
# suite; several ask for scheduler="sync", "threads" or "processes", which the plugin
# overrides.
SELECTION = {
    "tests/test_delayed.py": [
        "test_delayed",
        "test_operators",
        "test_methods",
        "test_attributes",
        "test_literates",
        "test_nout",
        "test_kwargs",
        "test_array_delayed",
        "test_array_bag_delayed",
        "test_delayed_decorator_on_method",
    ],
    "array/tests/test_array_core.py": [
        "test_blockwise_literals",
        "test_Array_computation",
        "test_stack_unknown_chunksizes",
        "test_concatenate_rechunk",
        "test_block_3d",
        "test_elemwise_with_ndarrays",
        "test_matmul",
        "test_broadcast_to",
        "test_reshape_unknown_dimensions",
        "test_map_blocks_block_info",
        "test_slicing_with_ndarray",
        "test_astype",
        "test_map_blocks",
        "test_arithmetic",
    ],
    "array/tests/test_reductions.py": [
        "test_moment",
        "test_nan",
        "test_reductions_with_empty_array",
        "test_trace",
        "test_weighted_reduction",
        "test_nanquantile_two_dims",
    ],
    "array/tests/test_rechunk.py": [
        "test_rechunk_1d",
        "test_rechunk_4d",
        "test_rechunk_expand2",
        "test_rechunk_method",
        "test_rechunk_unknown_from_array",
        "test_rechunk_empty_chunks",
    ],
    "bag/tests/test_bag.py": [
        "test_bag_map",
        "test_fold",
        "test_distinct",
        "test_frequencies",
        "test_foldby",
        "test_topk",
        "test_tree_reductions",
        "test_groupby",
        "test_to_dataframe",
        "test_accumulate",
    ],
    "dataframe/tests/test_groupby.py": [
        "test_full_groupby[tasks]",
        "test_groupby_on_index[disk-sync]",
        "test_series_groupby[tasks]",
        "test_groupby_apply_tasks[tasks]",
        "test_groupby_multiprocessing[disk]",
        "test_cumulative[tasks-cumsum-a-a]",
        "test_hash_groupby_aggregate[tasks-1-2-1]",
        "test_groupby_shift_series[tasks]",
        "test_split_out_multi_column_groupby[tasks]",
    ],
}


def test_dask_tests_pass_on_rankmesh(tmp_path):
    node_ids = [f"{DASK / module}::{test}" for module, tests in SELECTION.items() for test in tests]
    for module in SELECTION:
        assert (DASK / module).is_file(), f"dask {dask.__version__} does not ship {module}"
    report_path = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.python.dask_suite.plugin",
        "-p",
        "no:cacheprovider",
        "--dask-suite=rankmesh",
        f"--dask-suite-report={report_path}",
        "--timeout=60",
        "--dask-suite-close-timeout=30",
        "-q",
        "-rfE",
        "--tb=short",
        f"--basetemp={tmp_path / 'base'}",
        *node_ids,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("DASK_SUITE_SYSTEM", "PYTEST_TIMEOUT")}
    run = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = run.stdout[-8000:] + run.stderr[-4000:]
    assert report_path.exists(), f"no report from the plugin:\n{output}"
    report = json.loads(report_path.read_text())
    assert report["system"] == "rankmesh"
    tests = {
        nodeid.split("site-packages/")[-1]: record for nodeid, record in report["tests"].items()
    }
    assert len(tests) == len(node_ids), f"ran {len(tests)} of {len(node_ids)} tests:\n{output}"
    failed = {n: (r["outcome"], r["message"]) for n, r in tests.items() if r["outcome"] != "passed"}
    assert not failed, f"not passed on rankmesh: {failed}\n{output}"
    assert run.returncode == 0, output
    assert report["routed"] > 0, f"no computation reached the cluster:\n{output}"
    unrouted = [n for n, r in tests.items() if r["routed"] == 0]
    assert not unrouted, f"computed nothing on the cluster: {unrouted}\n{output}"
    local = {n: r["local"] for n, r in tests.items() if r["local"] or r["custom"]}
    assert not local, f"ran a scheduler other than the cluster: {local}\n{output}"
