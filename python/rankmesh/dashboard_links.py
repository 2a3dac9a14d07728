"""Links to a cluster's dashboard, and how clusters and clients show themselves in a
notebook (`_repr_html_`, as `distributed`'s do)."""

from __future__ import annotations

import html
import os
from urllib.parse import urlsplit

__all__ = ["cluster_html", "dashboard_link", "format_bytes"]


def dashboard_link(dashboard: str | None, token: str) -> str | None:
    """The status page of the dashboard at `dashboard` (http://host:port), carrying the
    token once. Under JupyterHub (JUPYTERHUB_SERVICE_PREFIX set) the link goes through
    jupyter-server-proxy on the notebook server, which reaches the port on this node."""
    if dashboard is None:
        return None
    page = f"status?token={token}"
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if prefix:
        port = urlsplit(dashboard).port
        return f"{prefix.rstrip('/')}/proxy/{port}/{page}"
    return f"{dashboard}/{page}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cluster_html(kind: str, address: str, link: str | None, rows: list[tuple[str, object]]) -> str:
    """A small table: what `kind` is connected to, its numbers and its dashboard link."""
    cells = [("scheduler", html.escape(address))]
    if link is not None:
        href = html.escape(link, quote=True)
        shown = html.escape(link.split("?", 1)[0])
        cells.append(("dashboard", f'<a href="{href}" target="_blank">{shown}</a>'))
    cells += [(name, html.escape(str(value))) for name, value in rows]
    body = "".join(
        f'<tr><th style="text-align:left">{name}</th><td style="text-align:left">{value}</td></tr>'
        for name, value in cells
    )
    return f"<div><h3>rankmesh.{kind}</h3><table>{body}</table></div>"
