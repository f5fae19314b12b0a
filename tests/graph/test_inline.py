"""Inlining nested compile regions: the flat graph equals an unmarked capture, block by block."""
import pytest
import torch
from torch import nn

from conftest import call, tiny_model
from ditfx.graph import meta
from ditfx.graph.inline import inline_subgraph_calls, is_subgraph_call
from ditfx.graph.structure import StructureError, analyse
from ditfx.models.dit import REGION_REUSE_KEYS


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


NO_REUSE_KEYS = "torch.compiler.nested_compile_region has no reuse_hash_fn argument in this torch (2.11 lacks it)"


class WrongKeyBlock(nn.Module):
    """Blocks of different inner widths under one constant reuse key: Dynamo stamps out the first block's
    subgraph for all of them."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)

    if REGION_REUSE_KEYS:
        @torch.compiler.nested_compile_region(reuse_hash_fn=lambda self, x, c: 0)
        def forward(self, x, c):
            return x + self.down(torch.tanh(self.up(x))) * c[:, None]


class WrongKeyStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(WrongKeyBlock(8, inner) for inner in (4, 16, 4))

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x * 2


@pytest.mark.skipif(not REGION_REUSE_KEYS, reason=NO_REUSE_KEYS)
def test_a_reuse_key_that_misses_a_difference_is_caught_before_inlining():
    gm, _ = capture(WrongKeyStack(), torch.randn(2, 5, 8), torch.randn(2, 8))
    before = [n.format_node() for n in gm.graph.nodes]
    with pytest.raises(ValueError, match=r"reuses subgraph .* traced for input .*\(16, 8\).*reuse_hash_fn"):
        inline_subgraph_calls(gm)
    assert [n.format_node() for n in gm.graph.nodes] == before  # nothing inlined
    with pytest.raises(StructureError, match="cannot inline a nested compile region"):
        analyse(gm)


@pytest.mark.skipif(not REGION_REUSE_KEYS, reason=NO_REUSE_KEYS)
def test_a_wrongly_keyed_region_is_named_and_never_run():
    """Dynamo's graph is wrong itself (the stamped-out subgraph does not fit block 1), so no backend can run it:
    ditfx names the cause in its fall-back warning, and the inner backend then fails instead of computing."""
    from torch._dynamo.exc import BackendCompilerFailed

    import ditfx

    fast = ditfx.optimize(WrongKeyStack(), ditfx.Config(compiler="aot_eager"))
    with pytest.warns(UserWarning, match="reuses subgraph"), pytest.raises(BackendCompilerFailed), \
            torch.no_grad():
        fast(torch.randn(2, 5, 8), torch.randn(2, 8))
    torch._dynamo.reset()


def test_reference_dit_blocks_share_a_reuse_key_per_structure():
    from ditfx.models.dit import DiTBlock, _block_reuse_key

    x, c = torch.randn(2, 4, 16), torch.randn(2, 16)
    key = _block_reuse_key(DiTBlock(16, 2, 64), x, c)
    assert _block_reuse_key(DiTBlock(16, 2, 64), x, c) == key
    others = [_block_reuse_key(DiTBlock(16, 4, 64), x, c), _block_reuse_key(DiTBlock(16, 2, 32), x, c),
              _block_reuse_key(DiTBlock(16, 2, 64), x.double(), c.double())]
    assert key not in others and len(set(others)) == len(others)
