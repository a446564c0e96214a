"""Cube archives at scale: export and import time, archive size, and the peak memory of each,
measured in a child process (`memstack cube export` / `cube import`) so that the figure is the
command's own and can be compared across cube sizes: a streaming export's memory does not grow
with the cube.

The cube is bench/speed.py's synthetic corpus (users talking with an assistant in sessions),
written through `add` with the real embedding model (or reused from an earlier run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..embed import Embedder
from . import speed
from .retrieval import machine


def run(items: int, *, workdir: Path, embedder: Embedder | None = None,
        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fill (or reuse) a store of `items` memories in `workdir`, then export its cube and
    import the archive into a new store, each in a child process."""
    source = workdir / f"speed-{items}.db"
    workdir.mkdir(parents=True, exist_ok=True)
    filled = speed.run(items, embedder=embedder, workdir=workdir, queries_count=10,
                       progress=progress, reuse=True)
    archive = workdir / f"cube-{items}.memcube"
    target = workdir / f"imported-{items}.db"
    for path in (archive, target):
        path.unlink(missing_ok=True)
    for leftover in workdir.glob(f"imported-{items}.db*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    export = _child(["--db", str(source), "cube", "export", "default", "-o", str(archive)])
    imported = _child(["--db", str(target), "cube", "import", str(archive)])
    manifest = json.loads(export["output"])
    return {"benchmark": "archive", "items": items, "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ingest_seconds": filled["ingest_seconds"],
            "counts": manifest["counts"], "archive_bytes": archive.stat().st_size,
            "export_seconds": export["seconds"], "export_peak_rss_mb": export["peak_rss_mb"],
            "import_seconds": imported["seconds"], "import_peak_rss_mb": imported["peak_rss_mb"],
            "imported_items": json.loads(imported["output"])["items"]}


# the child reports its own peak RSS (VmHWM, Linux) at exit: the rusage of a forked child
# would count the pages of this process (its model) that it shared before exec
_CHILD = ("import atexit, sys\n"
          "def peak():\n"
          "    status = open('/proc/self/status').read()\n"
          "    print('VmHWM', status.split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
          "atexit.register(peak)\n"
          "from memstack.cli import main\n"
          "sys.argv = ['memstack', *sys.argv[1:]]\n"
          "main()\n")


def _child(args: list[str]) -> dict[str, Any]:
    """Run `memstack --json ARGS` in a child process: its wall time and its own peak RSS."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, "--json", *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"memstack {' '.join(args)} failed: {done.stderr[-2000:]}")
    peak_kb = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
            "output": done.stdout}


def save(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"archive-{result['items']}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
