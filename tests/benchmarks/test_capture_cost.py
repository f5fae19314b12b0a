"""benchmarks/capture_cost.py: the opaque-block copy computes the model's output, and Dynamo sees one opaque call
per block instead of the blocks' ops."""

import pytest
import torch

from ditfx.models import zoo


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("capture_cost")


def test_opaque_blocks_compute_the_model_and_hide_the_blocks_from_dynamo(bench):
    named = zoo.load("DiT-T/2", batch=2)
    zoo.randomize(named.model, std=0.02)
    bench._BLOCKS[:] = list(named.model.blocks)
    skeleton = bench.with_opaque_blocks(named.model)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expected = named()
        out = named(torch.compile(skeleton, backend=capture, fullgraph=True))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert named.model.blocks is not skeleton.blocks and len(skeleton.blocks) == len(named.model.blocks)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("opaque_block" in t for t in targets) == len(named.model.blocks)
    assert not any("scaled_dot_product_attention" in t for t in targets)


def test_report_has_every_way_of_capturing(bench):
    report = bench.measure("DiT-T/2", rounds=1)
    assert set(report["median_s"]) == {"whole", "skeleton", "block", "skeleton+block"}
    assert all(t > 0 for t in report["median_s"].values())
