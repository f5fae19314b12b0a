"""Structure analysis on Dynamo and torch.export graphs of every supported family."""
import pytest
import torch

from conftest import FAMILIES, call, tiny_model
from ditfx.graph.structure import StructureError, analyse

EXPECTED_BLOCKS = {"reference": 4, "dit": 4, "pixart": 4, "sd3": 4, "flux": 5, "wan": 3, "sana": 3, "auraflow": 4,
                   "cogview4": 3, "qwenimage": 3, "chroma": 4, "hunyuan": 4, "ltx": 3}


def dynamo_graph(model, kw, family):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        call(torch.compile(model, backend=capture, fullgraph=True), kw, family)
    torch._dynamo.reset()
    return graphs[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_regions_and_streams(family):
    model, kw = tiny_model(family)
    s = analyse(dynamo_graph(model, kw, family))
    assert len(s.blocks) == EXPECTED_BLOCKS[family]
    assert [r.kind for r in s.regions][0] == "prologue" and s.regions[-1].kind == "epilogue"
    assert s.roles.latents is not None and s.roles.timestep is not None
    for r in s.block_regions:
        assert r.streams, f"{r.name} has no residual stream"
        assert r.primary_stream is not None
        # every block region reads its stream from the previous region, never from a later one
        assert all(a.op == "placeholder" or a in r.inputs for a in r.inputs)
    assert len(s.attention) >= len(s.blocks)


def test_conditioning_is_placed_by_data_flow():
    """DiTTransformer2DModel computes the timestep/label embedding inside every block's adaLN, and once more
    for its output layer: the block's own copy stays in its block (a skipped block skips it), the output
    layer's copy, read only by the epilogue, is hoisted out of block 0 to the prologue. All blocks then share
    one structure."""
    model, kw = tiny_model("dit")
    s = analyse(dynamo_graph(model, kw, "dit"))
    prologue = {n.name for n in s.region("prologue").nodes}
    assert set(s.hoisted) <= prologue
    for r in s.block_regions:
        assert any("embedding" in str(n.target) for n in r.nodes)
    from ditfx.graph.regions import extract
    assert len({extract(s.gm, r).signature for r in s.block_regions}) == 1


def test_flux_has_two_block_groups():
    model, kw = tiny_model("flux")
    s = analyse(dynamo_graph(model, kw, "flux"))
    assert [b.group for b in s.blocks] == ["transformer_blocks"] * 2 + ["single_transformer_blocks"] * 3
    # double-stream blocks carry two streams, the image stream is primary
    first = s.block_regions[0]
    assert len(first.streams) == 2
    assert first.outputs[first.streams[first.primary_stream][0]].name.startswith("hidden_states")


def test_long_skip_block_continues_the_newest_stream():
    """HunyuanDiT's last block reads block 0's output through a long skip and re-projects cat(skip, x) before its
    residual adds: its stream is the previous block's output, not the older skip value."""
    model, kw = tiny_model("hunyuan")
    s = analyse(dynamo_graph(model, kw, "hunyuan"))
    *_, before, last = s.block_regions
    (o, i), = last.streams
    assert last.inputs[i] is before.outputs[before.streams[0][0]]
    assert s.block_regions[0].outputs[0] in last.inputs  # the skip is read, but it is not the stream


@pytest.mark.parametrize("family", ["reference", "dit", "sd3"])
def test_export_graph(family):
    model, kw = tiny_model(family)
    ep = torch.export.export(model, (), kw)
    sig = ep.graph_signature
    weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    s = analyse(ep.graph_module, weight_names=weights)
    assert len(s.blocks) == EXPECTED_BLOCKS[family]
    assert all(r.streams for r in s.block_regions)


def test_no_blocks_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    graphs = []
    torch.compile(mlp, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(2, 3, 8))
    torch._dynamo.reset()
    with pytest.raises(StructureError, match="repeated block"):
        analyse(graphs[0])


def test_no_token_input_is_a_clear_error():
    graphs = []
    torch.compile(torch.nn.Linear(4, 4), backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(StructureError, match="token input"):
        analyse(graphs[0])
