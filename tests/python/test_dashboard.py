"""The scheduler's dashboard on a running cluster (issue 16): every endpoint's fields after
a known computation, the token on every request, the port on localhost only, and the
status page as a browser draws it."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask.array as da
import psutil
import pytest
import rankmesh
from browser import read_report
from rankmesh.cluster import find_binary

ENDPOINTS = ["/health", "/status", "/metrics", "/json/counts.json", "/json/identity.json"]
# The screenshot docs/dashboard.md shows is the one this test takes, copied there when
# RANKMESH_SCREENSHOTS is set (see docs/dashboard.md).
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def cluster():
    with rankmesh.LocalCluster(n_workers=2, memory_limit="1GiB") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with rankmesh.Client(cluster) as client:
        yield client


def base_and_token(client) -> tuple[str, str]:
    base, token = client.dashboard_link.split("/status?token=")
    return base, token


def fetch(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def test_every_endpoint_needs_the_token(client):
    base, token = base_and_token(client)
    for path in ENDPOINTS:
        assert fetch(base + path)[0] == 403, path
        assert fetch(base + path, token="0" * len(token))[0] == 403, path
        assert fetch(base + path, token=token)[0] == 200, path
    status, body = fetch(base + "/health")
    assert b"cluster token" in body


def test_the_port_listens_on_localhost_only(client):
    base, _ = base_and_token(client)
    port = int(base.rsplit(":", 1)[1])
    listening = [
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening == ["127.0.0.1"]


def test_endpoints_report_a_known_computation(client):
    base, token = base_and_token(client)
    chunks = da.ones((400, 400), chunks=100) * 2  # 16 chunks of 80 kB, held
    held = client.persist(chunks)
    rankmesh.wait(rankmesh.futures_of(held))
    counts = json.loads(fetch(base + "/json/counts.json", token)[1])
    assert counts["workers"] == 2
    assert counts["cores"] == 2
    assert counts["memory"] >= 16
    assert counts["erred"] == 0
    assert counts["clients"] >= 1
    assert counts["hosts"] == 1
    assert counts["tasks"] >= counts["memory"]

    identity = json.loads(fetch(base + "/json/identity.json", token)[1])
    assert identity["type"] == "Scheduler"
    assert identity["address"] == client.address
    assert identity["n_workers"] == 2
    assert set(identity["workers"]) == {f"tcp://{w['data_address']}" for w in client.workers()}
    assert {w["memory_limit"] for w in identity["workers"].values()} == {1 << 30}

    metrics = fetch(base + "/metrics", token)[1].decode()
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert float(samples['dask_scheduler_tasks{state="memory"}']) >= 16
    counted = {
        k: float(v)
        for k, v in samples.items()
        if k.startswith("rankmesh_task_duration_seconds_count{")
    }
    assert sum(counted.values()) >= 16, counted
    prefixes = {k.split('"')[1] for k in counted}
    done = sum(
        float(
            samples[
                f'dask_scheduler_prefix_state_totals_total{{task_prefix_name="{p}",state="memory"}}'
            ]
        )
        for p in prefixes
    )
    assert done >= 16
    assert float(samples['dask_scheduler_workers{state="idle"}']) == 2
    assert 'rankmesh_transferred_bytes_total{transport="tcp"}' in samples
    assert (
        sum(
            float(samples[f'rankmesh_worker_memory_limit_bytes{{worker="{w["id"]}"}}'])
            for w in client.workers()
        )
        == 2 << 30
    )
    del held


def test_no_dashboard_means_no_port_and_no_link():
    with rankmesh.LocalCluster(n_workers=1, dashboard_address=None) as cluster:
        assert cluster.dashboard_link is None
        with rankmesh.Client(cluster) as client:
            assert client.dashboard_link is None
            ports = {
                c.laddr.port
                for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.pid == cluster.pid
            }
            assert len(ports) == 1  # the scheduler's own port only


def test_links_go_through_jupyterhubs_proxy(monkeypatch, cluster):
    port = cluster.dashboard_link.split("/status")[0].rsplit(":", 1)[1]
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    with rankmesh.Client(cluster) as client:
        assert client.dashboard_link.startswith(f"/user/ada/proxy/{port}/status?token=")
        html = client._repr_html_()
        assert "rankmesh.Client" in html and "workers</th><td" in html


def slow_square(i: int) -> int:
    time.sleep(0.3)
    return i * i


def test_the_status_page_draws_progress_memory_and_the_task_stream(client, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (scripts/install.sh installs it)")
    held = client.persist(da.random.random((1000, 1000), chunks=250))  # 8 MB on 2 workers
    rankmesh.wait(rankmesh.futures_of(held))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        squares = client.map(slow_square, range(12))  # about 2 s on two workers
        page.goto(client.dashboard_link)
        # The token went into a cookie and out of the address bar.
        assert "token" not in page.url
        page.wait_for_selector('.prefix-progress[data-prefix="slow_square"]')
        assert client.gather(squares) == [i * i for i in range(12)]
        # Bars fill once each worker's memory report reaches the scheduler (every second).
        page.wait_for_function(
            "document.querySelectorAll('.worker-memory .managed:not([style=\"width:0%\"])')"
            ".length === 2",
            timeout=30_000,
        )
        page.wait_for_function(
            "document.querySelector('.prefix-progress[data-prefix=\"slow_square\"] .label')"
            ".textContent === '12 / 12'"
        )
        done = page.locator('.prefix-progress[data-prefix="slow_square"] .done')
        assert done.get_attribute("style") == "width:100%"
        page.wait_for_function("Number(document.getElementById('stream').dataset.bars) >= 28")
        assert "slow_square" in page.inner_text("#stream-legend")
        assert page.locator(".worker-occupancy").count() == 2
        summary = page.inner_text("#summary")
        assert "workers: 2" in summary and "erred: 0" in summary
        screenshot = tmp_path / "dashboard-status.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("RANKMESH_SCREENSHOTS"):
        DOCS_IMAGES.mkdir(exist_ok=True)
        shutil.copy(screenshot, DOCS_IMAGES / screenshot.name)
    del held, squares


def cube(i: int) -> int:
    return i * i * i


def test_rankmesh_top_shows_the_cluster_in_a_terminal(cluster, client):
    squares = client.map(cube, range(4))
    assert client.gather(squares) == [0, 1, 8, 27]
    shown = subprocess.run(
        [find_binary(), "top", "--once", cluster.scheduler_file],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    screen = shown.stdout
    assert "workers 2" in screen and "threads 2" in screen, screen
    rows = [line for line in screen.splitlines() if line.startswith("cube ")]
    assert rows and " 4/4 " in rows[0] + " ", screen
    worker_rows = [line for line in screen.splitlines() if "running" in line]
    assert len(worker_rows) == 2 and all("1.0 GiB" in row for row in worker_rows), screen


def test_rankmesh_top_needs_no_dashboard_and_names_a_missing_file(tmp_path):
    # `top` asks the scheduler over its own port, as a batch job's login node must.
    with rankmesh.LocalCluster(n_workers=1, dashboard_address=None) as cluster:
        shown = subprocess.run(
            [find_binary(), "top", "--once", cluster.scheduler_file],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert shown.returncode == 0, shown.stderr
    assert "workers 1" in shown.stdout, shown.stdout
    missing = subprocess.run(
        [find_binary(), "top", "--once", str(tmp_path / "gone.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "gone.json: no such scheduler file" in missing.stderr


def test_performance_report_around_a_block(client, tmp_path):
    report = tmp_path / "block.html"
    report.write_text("an older report, readable by all")
    report.chmod(0o644)
    with rankmesh.performance_report(str(report)):
        assert client.gather(client.map(cube, range(30))) == [i**3 for i in range(30)]
    assert report.stat().st_mode & 0o777 == 0o600  # replaced, not rewritten in place
    planted = tmp_path / "planted.html"
    planted.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError), rankmesh.performance_report(str(planted)):
        pass
    assert not (tmp_path / "elsewhere").exists()
    seen = read_report(report)
    assert seen["errors"] == []
    assert sorted(seen["workers"]) == sorted(str(w["id"]) for w in client.workers())
    assert "cube" in seen["prefixes"]
    assert seen["bars"] >= 30 and seen["lines"] == 2


def test_a_local_run_writes_its_report_when_the_script_ends(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import dask.array as da, rankmesh\n"
        "client = rankmesh.get_client()\n"
        "x = da.ones((1000, 1000), chunks=100) + 1\n"
        "print(float(x.sum().compute(scheduler=client.get)))\n"
    )
    report = tmp_path / "job.html"
    shown = subprocess.run(
        [
            find_binary(),
            "local",
            "-n",
            "2",
            "--report",
            str(report),
            "--python",
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "2000000.0"
    assert f"report written to {report}" in shown.stderr
    seen = read_report(report, tmp_path / "report.png")
    assert seen["errors"] == []
    assert len(seen["workers"]) == 2 and seen["lines"] == 2
    assert seen["bars"] >= 100
    assert {"ones_like", "add", "sum"} & set(seen["prefixes"]), seen["prefixes"]
