"""Compares runs of Dask's tests on rankmesh and on `distributed` (scripts/dask-suite.sh).

    python tests/python/dask_suite/compare.py DIR

DIR holds one folder per system (``rankmesh/``, ``distributed/``), each with the plugin's
JSON report of every test module (``<module>.json``, written with --dask-suite-report) and
optionally its wall time in seconds (``<module>.time``). Prints the counts per module and
system, the tests that pass under distributed but not under rankmesh (with rankmesh's
first error line), the reverse, and the tests that were not routed to the cluster; writes
the same to DIR/summary.txt. Exits 1 with --fail-on-difference if the first list is not
empty, 2 if a report is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

SYSTEMS = ("rankmesh", "distributed")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
PASSING = ("passed", "xpassed")


def short_id(nodeid: str) -> str:
    """dask/...::test, whatever folder pytest ran from."""
    path, sep, rest = nodeid.partition("::")
    marker = path.rfind("dask/")
    return (path[marker:] if marker >= 0 else path) + sep + rest


def load(folder: Path) -> dict[str, dict]:
    """Reports by module name."""
    reports = {}
    for path in sorted(folder.glob("*.json")):
        report = json.loads(path.read_text())
        report["tests"] = {short_id(k): v for k, v in report["tests"].items()}
        wall = path.with_suffix(".time")
        report["wall_s"] = float(wall.read_text()) if wall.exists() else None
        reports[path.stem] = report
    return reports


def _by_function(records: dict[str, dict]) -> dict[str, list[dict]]:
    """Records grouped by test function (parametrizations together), in name order."""
    groups: dict[str, list[dict]] = {}
    for nodeid, record in sorted(records.items()):
        groups.setdefault(nodeid.split("[")[0], []).append(record)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--fail-on-difference", action="store_true")
    args = parser.parse_args()
    runs = {system: load(args.dir / system) for system in SYSTEMS}
    lines: list[str] = []
    out = lines.append
    missing = [s for s in SYSTEMS if not runs[s]]
    if missing:
        print(f"no reports for {missing} under {args.dir}", file=sys.stderr)
        return 2
    modules = sorted(set(runs["rankmesh"]) | set(runs["distributed"]))

    out("Counts per module (outcome of each test; error = setup or teardown failed)")
    header = f"{'module':<22} {'system':<12}" + "".join(f"{o:>9}" for o in OUTCOMES)
    out(header + f"{'total':>7}{'routed':>8}{'wall s':>8}")
    totals = {s: dict.fromkeys(OUTCOMES, 0) for s in SYSTEMS}
    for module in modules:
        for system in SYSTEMS:
            report = runs[system].get(module)
            if report is None:
                out(f"{module:<22} {system:<12} (no report: the run did not finish)")
                continue
            counts = dict.fromkeys(OUTCOMES, 0)
            for record in report["tests"].values():
                if record["outcome"] in counts:
                    counts[record["outcome"]] += 1
            for outcome, n in counts.items():
                totals[system][outcome] += n
            wall = f"{report['wall_s']:.0f}" if report["wall_s"] is not None else "?"
            out(
                f"{module:<22} {system:<12}"
                + "".join(f"{counts[o]:>9}" for o in OUTCOMES)
                + f"{sum(counts.values()):>7}{report['routed']:>8}{wall:>8}"
            )
    for system in SYSTEMS:
        counts = totals[system]
        wall = sum(r["wall_s"] or 0 for r in runs[system].values())
        out(
            f"{'ALL':<22} {system:<12}"
            + "".join(f"{counts[o]:>9}" for o in OUTCOMES)
            + f"{sum(counts.values()):>7}{'':>8}{wall:>8.0f}"
        )

    def tests(system: str) -> dict[str, dict]:
        merged: dict[str, dict] = {}
        for report in runs[system].values():
            merged.update(report["tests"])
        return merged

    rankmesh, distributed = tests("rankmesh"), tests("distributed")

    def differences(good: dict, bad: dict) -> list[tuple[str, dict | None]]:
        found = []
        for nodeid, record in sorted(good.items()):
            if record["outcome"] not in PASSING:
                continue
            other = bad.get(nodeid)
            if other is None or other["outcome"] not in PASSING + ("skipped", "xfailed"):
                found.append((nodeid, other))
        return found

    worse = differences(distributed, rankmesh)  # what --fail-on-difference looks at
    for passing, failing, good, bad in (
        ("distributed", "rankmesh", distributed, rankmesh),
        ("rankmesh", "distributed", rankmesh, distributed),
    ):
        found = differences(good, bad)
        out("")
        out(f"Pass under {passing}, fail under {failing}: {len(found)}")
        for nodeid, record in found:
            if record is None:
                out(f"  {nodeid}  [not run under {failing}]")
            else:
                out(f"  {nodeid}  [{record['outcome']}] {record['message'][:200]}")
    skipped_only = [
        n
        for n, r in distributed.items()
        if r["outcome"] in PASSING
        and n in rankmesh
        and rankmesh[n]["outcome"] in ("skipped", "xfailed")
    ]
    if skipped_only:
        out("")
        out(f"Pass under distributed, skipped or xfailed under rankmesh: {len(skipped_only)}")
        for nodeid in sorted(skipped_only):
            out(f"  {nodeid}  [{rankmesh[nodeid]['outcome']}] {rankmesh[nodeid]['message']}")

    for system, records in (("rankmesh", rankmesh), ("distributed", distributed)):
        local = {n: r for n, r in records.items() if r["local"]}
        custom = {n: r for n, r in records.items() if r["custom"]}
        out("")
        out(
            f"Not routed under {system}: {len(local)} tests ran a local scheduler, "
            f"{len(custom)} passed their own scheduler"
        )
        for label, group in (("local", local), ("own", custom)):
            for test, records in _by_function(group).items():
                outcomes = ", ".join(
                    f"{o} x{n}" for o, n in sorted(Counter(r["outcome"] for r in records).items())
                )
                if label == "local":
                    where = Counter()
                    for record in records:
                        where.update(record["local"])
                    what = ", ".join(f"{k} x{v}" for k, v in sorted(where.items()))
                else:
                    what = ", ".join(sorted({n for r in records for n in r["custom"]}))
                count = f" ({len(records)} parametrizations)" if len(records) > 1 else ""
                out(f"  {label:<6} {test}{count} [{outcomes}]: {what}")
        restarts = [n for r in runs[system].values() for n in r.get("restarts", [])]
        if restarts:
            out(f"  cluster found dead and restarted before: {restarts}")

    text = "\n".join(lines)
    print(text)
    (args.dir / "summary.txt").write_text(text + "\n")
    return 1 if args.fail_on_difference and worse else 0


if __name__ == "__main__":
    sys.exit(main())
