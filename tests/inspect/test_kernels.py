"""``ditfx inspect --kernels`` lists the lowered sites; ``--kernel-source`` prints a kernel."""
import json

import torch

from ditfx.cli import main


def test_inspect_lists_lowered_sites_and_prints_sources(capsys):
    assert main(["inspect", "DiT-T/2", "--kernels", "--json"]) == 0
    section = json.loads(capsys.readouterr().out)["kernels"]
    assert section["kernels"]["adaln_modulate"] == 8 and section["kernels"]["gated_residual"] == 8
    (generated,) = [k for k in section["kernels"] if k.startswith("layer_norm_elementwise_")]
    (site,) = section["sites"]["epilogue"]
    assert site["kernel"] == generated and site["nodes"][0].startswith("layer_norm")
    torch._dynamo.reset()

    assert main(["inspect", "DiT-T/2", "--kernel-source", generated[:30]]) == 0
    source = capsys.readouterr().out
    assert "@triton.jit" in source and "tl.rsqrt" in source and "LayerNorm" in source
    torch._dynamo.reset()

    assert main(["inspect", "DiT-T/2", "--kernel-source", "no_such_kernel"]) == 2
    assert "adaln_modulate" in capsys.readouterr().err
    torch._dynamo.reset()
