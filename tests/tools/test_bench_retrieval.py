"""tools/bench_retrieval.py's working-memory measurement."""

import os
import subprocess
import sys

import numpy as np

from tests import helpers

_CHILD = """
import sys
sys.path.insert(0, {tools!r})
sys.argv = ["bench_retrieval.py"]
import bench_retrieval
print(bench_retrieval._rss_mib())
"""


def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    # getrusage's ru_maxrss survives execve, so a small process started by a
    # large one reported the large one's peak as its own working memory.
    parent = np.ones((1200, 1 << 20), np.uint8)  # 1.2 GiB resident here
    parent[::4096] = 2
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(tools=os.path.join(helpers.REPO_ROOT, "tools"))],
        capture_output=True, text=True, check=True, cwd=helpers.REPO_ROOT,
    )
    peak = float(child.stdout.strip().splitlines()[-1])
    assert 0 < peak < 600, peak
    del parent
