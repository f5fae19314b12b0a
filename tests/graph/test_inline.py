"""Inlining nested compile regions: the flat graph equals an unmarked capture, block by block."""
import torch
from torch import nn

from conftest import call, tiny_model
from ditfx.graph import meta
from ditfx.graph.inline import inline_subgraph_calls, is_subgraph_call
from ditfx.graph.structure import analyse


class PlainBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.randn(width))

    def forward(self, x, c):
        return x + torch.tanh(self.fc(x) * (1 + c[:, None]) * self.scale)


class MarkedBlock(PlainBlock):
    @torch.compiler.nested_compile_region
    def forward(self, x, c):
        return x + torch.tanh(self.fc(x) * (1 + c[:, None]) * self.scale)


class Stack(nn.Module):
    def __init__(self, block_cls, depth: int = 3, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(block_cls(width) for _ in range(depth))

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x * 2


def capture(model, *args, run=None):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    compiled = torch.compile(model, backend=keep, fullgraph=True)
    with torch.no_grad():
        run(compiled) if run else compiled(*args)
    torch._dynamo.reset()
    return graphs[0]


def targets(gm):
    return [meta.target_name(n) for n in gm.graph.nodes if n.op == "call_function"]


def test_inlined_graph_equals_an_unmarked_capture():
    torch.manual_seed(0)
    marked = Stack(MarkedBlock)
    plain = Stack(PlainBlock)
    plain.load_state_dict(marked.state_dict())
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)

    gm, inputs = capture(marked, x, c)
    assert sum(map(is_subgraph_call, gm.graph.nodes)) == 3  # traced once, stamped out twice
    report = inline_subgraph_calls(gm)
    assert (report.calls, report.subgraphs) == (3, 1)
    assert not any(map(is_subgraph_call, gm.graph.nodes))
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # the subgraph holders are gone

    plain_gm, _ = capture(plain, x, c)
    assert targets(gm) == targets(plain_gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], marked(x, c), rtol=0, atol=0)


def test_copied_nodes_belong_to_the_block_that_calls_them():
    gm, _ = capture(Stack(MarkedBlock), torch.randn(2, 5, 8), torch.randn(2, 8))
    inline_subgraph_calls(gm)
    owners = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "tanh" in meta.target_name(n):
            owners.append([path for path, _ in meta.module_stack(n)])
    assert owners == [["blocks.0"], ["blocks.1"], ["blocks.2"]]


def test_a_graph_without_nested_regions_is_left_alone():
    gm, _ = capture(Stack(PlainBlock), torch.randn(2, 5, 8), torch.randn(2, 8))
    before = [n.format_node() for n in gm.graph.nodes]
    assert inline_subgraph_calls(gm).calls == 0
    assert [n.format_node() for n in gm.graph.nodes] == before


def test_reference_dit_blocks_are_traced_once():
    """The reference DiT marks its block: Dynamo traces one and stamps out the rest; analysis still sees each."""
    model, kw = tiny_model("reference")
    gm, _ = capture(model, run=lambda compiled: call(compiled, kw, "reference"))
    s = analyse(gm)
    assert (s.inlined.calls, s.inlined.subgraphs) == (len(s.blocks), 1)
    assert [b.path for b in s.blocks] == [f"blocks.{i}" for i in range(len(s.blocks))]
