"""Run a script under `torchrun --standalone` (gloo on CPU, one thread per rank) and collect its results.

A script reports with `dist_checks.report(name, value)` (rank 0 prints one ``WIDEMOE_RESULT`` JSON line
per result); the pytest test asserts on the values, so the tolerances live in the tests. A launch that
fails or outlives its timeout is an AssertionError carrying the tail of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"
MARK = "WIDEMOE_RESULT "


def torchrun(script: str, nproc: int, *args: str, timeout: float = 150, expect_rc: int = 0,
             env: dict[str, str] | None = None) -> tuple[dict[str, object], str]:
    """(results by name, combined output) of `script` on `nproc` ranks; `script` "-m widemoe" runs the
    package's CLI (`python -m widemoe`)."""
    target = script.split() if script.startswith("-m ") else [str(SCRIPTS / script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WIDEMOE_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(SCRIPTS.parent.parent),
                                               os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{script} on {nproc} ranks ran past {timeout} s (a hang?)\n"
                             f"{out[-4000:]}") from None
    out = res.stdout + res.stderr
    if expect_rc is not None and (res.returncode == 0) != (expect_rc == 0):
        raise AssertionError(f"{script} on {nproc} ranks exited {res.returncode}\n{out[-6000:]}")
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK):])
            results[rec["name"]] = rec["value"]
    return results, out
