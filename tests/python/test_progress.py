"""Progress in Python (issue 16): rankmesh.progress in a terminal and in a notebook, and
dask.diagnostics.ProgressBar around a rankmesh computation."""

import io
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import rankmesh
from dask.diagnostics import ProgressBar

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "examples" / "progress.ipynb"


@pytest.fixture(scope="module")
def client():
    with rankmesh.LocalCluster(n_workers=2, dashboard_address=None) as cluster:
        with rankmesh.Client(cluster) as client:
            yield client


def slow_square(i: int) -> int:
    time.sleep(0.05)
    return i * i


def fails(i: int) -> int:
    raise ValueError(i)


def test_progress_draws_one_line_in_a_terminal(client):
    squares = client.map(slow_square, range(20))
    broken = client.submit(fails, 1)
    out = io.StringIO()
    with redirect_stdout(out):
        assert rankmesh.progress(squares, broken, notebook=False) is None
    frames = out.getvalue().split("\r")
    assert frames[-1].startswith("[" + "#" * 40 + "] | 100% Completed")
    assert frames[-1].rstrip().endswith("| 1 erred")
    percents = [int(m) for m in re.findall(r"(\d+)% Completed", out.getvalue())]
    assert percents == sorted(percents) and percents[-1] == 100
    assert client.gather(squares) == [i * i for i in range(20)]


def slowly(block: np.ndarray) -> np.ndarray:
    time.sleep(0.01)
    return block + 1


def test_progress_bar_moves_and_reaches_100_percent_on_a_rankmesh_computation(client):
    x = da.random.RandomState(0).random((4000, 4000), chunks=250).map_blocks(slowly)
    expected = x.sum(axis=0).compute(scheduler="threads")
    out = io.StringIO()
    with ProgressBar(out=out, dt=0.05):
        got = x.sum(axis=0).compute(scheduler=client.get)
    np.testing.assert_allclose(got, expected)
    percents = [int(m) for m in re.findall(r"\|\s*(\d+)% Completed", out.getvalue())]
    assert percents == sorted(percents) and percents[-1] == 100
    # 256 blocks of 10 ms on two workers: the bar is seen between its ends.
    assert any(0 < p < 100 for p in percents), percents


def test_progress_bar_reports_an_error_without_reaching_100(client):
    out = io.StringIO()
    with pytest.raises(ValueError), ProgressBar(out=out, dt=0.05):
        dask.delayed(fails)(3).compute(scheduler=client.get)
    assert "100% Completed" not in out.getvalue()


def test_the_progress_notebook_draws_its_widget_and_ends_at_100_percent(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]
    shown = outputs[1][0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in shown, shown
    printed = "".join(o.get("text", "") for o in outputs[2])
    bars = eval(printed)  # {prefix: (value, max)}, as the notebook prints it
    assert bars and all(value == maximum for value, maximum in bars.values()), bars
    assert {"slow_square"} <= set(bars)
    progress_bar = "".join(o.get("text", "") for o in outputs[3])
    assert "100% Completed" in progress_bar
