"""Compiled regions use torch's FX-graph and AOTAutograd caches, so a second process loads what the first compiled.

Regions compile outside Dynamo (runtime/compiler.py); without a ShapeEnv in a tracing context both caches would
skip them ("Bypassing FX Graph Cache because 'No shape env'") and ``save_cache_artifacts()`` would return None.
Two fresh processes share one Inductor cache directory: the first misses and writes, the second hits.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json
import torch
import ditfx
from ditfx.models import zoo
from torch._dynamo.utils import counters

torch.set_num_threads(1)
named = zoo.load("DiT-T/2", batch=2, seed=0)
with torch.no_grad():
    ref = named()
    named.model = ditfx.optimize(named.model, ditfx.Config(compiler="inductor"))
    out = named()
artifacts = torch.compiler.save_cache_artifacts()
print(json.dumps({
    "inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"]),
    "artifacts": artifacts is not None, "compiles": ditfx.stats(named.model).region_compiles,
    "diff": (out - ref).abs().max().item(), "out": out.flatten()[:8].tolist(),
}))
"""


def _run(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE_"))}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow  # Inductor in fresh processes
def test_a_second_process_hits_the_fx_graph_and_autograd_caches(tmp_path):
    cold = _run(tmp_path)
    assert cold["compiles"] >= 1 and cold["diff"] < 1e-4
    assert cold["inductor"].get("fxgraph_cache_bypass", 0) == 0, cold["inductor"]
    assert cold["inductor"].get("fxgraph_cache_miss", 0) == cold["compiles"], cold["inductor"]
    assert cold["aot_autograd"].get("autograd_cache_bypass", 0) == 0, cold["aot_autograd"]
    assert cold["aot_autograd"].get("autograd_cache_saved", 0) >= 1, cold["aot_autograd"]
    assert cold["artifacts"], "save_cache_artifacts() recorded nothing"

    warm = _run(tmp_path)
    assert warm["compiles"] == cold["compiles"]
    assert warm["aot_autograd"].get("autograd_cache_hit", 0) == cold["compiles"], warm["aot_autograd"]
    assert warm["inductor"].get("fxgraph_cache_hit", 0) == cold["compiles"], warm["inductor"]
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm["inductor"]
    assert warm["out"] == cold["out"]  # the same kernels
