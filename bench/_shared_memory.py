"""What the benchmarks say of the shared memory rankmesh's workers keep results in: the
folder, and whether its tmpfs gives huge pages (docs/memory.md), which decides how fast
results move between processes on a node."""

from __future__ import annotations

import json
import subprocess

from rankmesh.cluster import find_binary


def shared_memory() -> str:
    """`shared memory: <folder>, huge pages: <mode>`, as `rankmesh doctor` finds them for
    the binary the workers run ($RANKMESH_BINARY, $RANKMESH_SHM_BASE)."""
    ran = subprocess.run(
        [find_binary(), "doctor", "--json"], capture_output=True, text=True, timeout=120
    )
    checks = json.loads(ran.stdout)["checks"]
    facts = next(check["facts"] for check in checks if check["name"] == "shared_memory")
    return f"shared memory: {facts['path']}, huge pages: {facts.get('huge_pages', 'unknown')}"
