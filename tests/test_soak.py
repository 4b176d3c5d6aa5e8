import subprocess
import sys

import psutil

from fedsim.scripts.soak import tree_rss_bytes


def test_tree_rss_counts_descendants() -> None:
    me = psutil.Process()
    alone, _ = tree_rss_bytes(me)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(50):  # wait until the child has started
            if psutil.Process(child.pid).memory_info().rss > 1_000_000:
                break
        total, count = tree_rss_bytes(me)
        assert count >= 1
        assert total > alone  # the child's resident memory is included
    finally:
        child.kill()
        child.wait()
