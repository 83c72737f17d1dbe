"""napari_sam.speed.allocator: large temporaries stop page-faulting once the fast path is on.

Each case runs in a fresh interpreter: malloc's settings belong to the whole process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc malloc's",
)

# Rounds of two large temporaries (32 and 24 MB), as a decoder or encoder call makes them:
# page faults per round after the first.
PROGRAM = """
import json, resource, sys
import numpy as np

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

applied = None
if sys.argv[1] == "optimize":
    import napari_sam
    from napari_sam.speed import optimize
    optimize(napari_sam.build_sam("vit_t"))
elif sys.argv[1] == "direct":
    from napari_sam.speed.allocator import keep_freed_memory
    applied = [keep_freed_memory(), keep_freed_memory()]
counts = []
for _ in range(6):
    before = faults()
    a = np.ones(4 << 20)
    b = np.ones(3 << 20)
    del a, b
    counts.append(faults() - before)
print(json.dumps({"faults": counts[1:], "applied": applied}))
"""


def _run(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fast_path_keeps_large_temporaries_mapped():
    default = _run("none")
    # glibc's adaptive thresholds: each round maps (and zeroes) fresh pages again.
    assert min(default["faults"]) > 100
    tuned = _run("optimize")
    assert max(tuned["faults"]) < 10


def test_keep_freed_memory_is_idempotent_and_can_be_turned_off():
    assert _run("direct")["applied"] == [True, True]
    off = _run("direct", NAPARI_SAM_MALLOC="default")
    assert off["applied"] == [False, False]
    assert min(off["faults"]) > 100
    # The user's own malloc settings win.
    assert _run("direct", MALLOC_TOP_PAD_="0")["applied"] == [False, False]
