"""Dask's own tests with every computation on a rankmesh or a `distributed` cluster.

`plugin.py` is the pytest plugin, `compare.py` compares two runs, `scripts/dask-suite.sh`
runs the whole suite under both systems; `tests/python/test_dask_suite.py` is the CI part.
"""
