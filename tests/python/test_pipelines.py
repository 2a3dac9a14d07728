"""Real Dask workloads on a 2-worker LocalCluster give what Dask's threaded scheduler gives."""

import operator

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed
from xarray_anomaly import anomaly_pipeline, synthetic_dataset


def test_xarray_anomaly_pipeline_matches_threads(client):
    # Over a year, so days of the year repeat and anomalies are not all zero.
    ds = synthetic_dataset(days=400, chunk_days=100, seed=1)
    ours = anomaly_pipeline(ds).compute()
    theirs = anomaly_pipeline(ds).compute(scheduler="threads")
    scale = float(np.abs(theirs.values).max())
    assert ours.shape == theirs.shape == (400,)
    assert scale > 1e-3  # the global mean of unit noise over 64,800 cells: ~0.004
    assert float(np.abs(ours.values - theirs.values).max()) <= 1e-6 * scale


def test_dataframe_groupby_mean_matches_threads(client):
    rng = np.random.default_rng(2)
    pdf = pd.DataFrame({"key": rng.integers(0, 17, 20_000), "value": rng.normal(size=20_000)})
    ddf = dd.from_pandas(pdf, npartitions=8)
    ours = ddf.groupby("key").value.mean().compute(scheduler=client.get).sort_index()
    theirs = ddf.groupby("key").value.mean().compute(scheduler="threads").sort_index()
    pd.testing.assert_series_equal(ours, theirs)
    assert len(ours) == 17


def test_bag_foldby_matches_threads(client):
    bag = db.from_sequence(range(10_000), npartitions=10)
    folded = bag.foldby(lambda x: x % 7, operator.add, 0, operator.add, 0)
    ours = dict(folded.compute(scheduler=client.get))
    theirs = dict(folded.compute(scheduler="threads"))
    assert ours == theirs
    assert sum(ours.values()) == sum(range(10_000))


def test_tree_reduction_of_32767_tasks(client):
    def leaf(i):
        return np.full(1000, float(i))

    level = [delayed(leaf)(i) for i in range(2**14)]
    while len(level) > 1:
        level = [delayed(operator.add)(a, b) for a, b in zip(level[::2], level[1::2], strict=True)]
    (ours,) = dask.compute(level[0], scheduler=client.get)
    np.testing.assert_array_equal(ours, np.full(1000, float(sum(range(2**14)))))


def test_map_of_10000_tasks(client):
    futures = client.map(lambda x: x * x, range(10_000))
    assert client.gather(futures) == [x * x for x in range(10_000)]


def test_dask_array_with_large_chunks_moves_between_workers(client):
    x = da.random.RandomState(3).random((4000, 3000), chunks=(1000, 3000))
    expr = (x @ x.T).sum(axis=0)
    np.testing.assert_allclose(expr.compute(), expr.compute(scheduler="threads"), rtol=1e-12)


def test_default_scheduler_inside_with_block(cluster):
    import rankmesh

    x = da.arange(1000, chunks=100)
    with rankmesh.Client(cluster) as client:
        assert dask.config.get("scheduler") == client.get
        assert int(x.sum().compute()) == sum(range(1000))
    assert dask.config.get("scheduler", None) != client.get


@pytest.mark.parametrize("n", [1, 5])
def test_scatter_and_submit_with_futures(client, n):
    data = client.scatter(list(range(n)))
    total = client.submit(sum, data)
    assert total.result() == sum(range(n))


def test_a_scattered_broadcast_array_travels_by_its_distinct_values(client):
    """`np.broadcast_to` shows 512 MB here from 64 KB: pickled as numpy pickles it, the
    scatter was a frame over the 256 MiB limit, and the client lost its connection."""
    row = np.arange(8000.0)
    whole = np.broadcast_to(row, (8000, 8000))
    scattered = client.scatter(whole)
    column_sums = client.submit(np.sum, scattered, axis=0)
    np.testing.assert_array_equal(column_sums.result(), whole.sum(axis=0))
    back = scattered.result()
    assert back.shape == whole.shape and back.strides[0] == 0
    np.testing.assert_array_equal(back[::999], whole[::999])


def test_persist_then_compute(client):
    x = da.ones((100, 100), chunks=(10, 100))
    persisted = client.persist(x + 1)
    assert float(persisted.sum().compute(scheduler=client.get)) == 20_000.0


def test_a_persisted_xarray_dataset_feeds_the_pipeline(client):
    """xarray's finalize step ships the persisted dataset (futures in its graph) inside
    the task: the futures travel as keys, the values as the task's inputs."""
    ds = synthetic_dataset(days=400, chunk_days=100, seed=4)
    persisted = client.persist(ds)
    ours = client.compute(anomaly_pipeline(persisted)).result()
    theirs = anomaly_pipeline(ds).compute(scheduler="threads")
    scale = float(np.abs(theirs.values).max())
    assert float(np.abs(ours.values - theirs.values).max()) <= 1e-6 * scale


def test_a_future_in_a_delayed_call_is_its_value(client):
    future = client.submit(operator.mul, 6, 7)
    doubled = delayed(operator.mul)(future, 2)
    assert client.compute(doubled).result() == 84


def test_as_completed_and_wait(client):
    import rankmesh

    futures = client.map(operator.neg, range(20))
    done, not_done = rankmesh.wait(futures)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in rankmesh.as_completed(futures)) == sorted(
        -i for i in range(20)
    )
