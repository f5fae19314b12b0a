"""Symbolic FLOPs per region: export the model with every input dimension dynamic (``Dim.AUTO``: export keeps
what the model allows dynamic and specialises the rest), analyse the exported graph, and name the symbols.

Names: ``B`` the batch; for image latents (B, C, H, W) ``H`` and ``W`` (the image tokens are
``(H // p) * (W // p)``); for video latents (B, C, F, H, W) also ``F``; for packed token latents (B, T, C) ``T``;
``L`` the text tokens (dimension 1 of a second token input, e.g. ``encoder_hidden_states``).
"""
from __future__ import annotations

import sympy
import torch

from ditfx.graph import cost
from ditfx.graph.structure import analyse
from ditfx.models.zoo import NamedModel

LATENT_DIM_NAMES = {3: {1: "T"}, 4: {2: "H", 3: "W"}, 5: {2: "F", 3: "H", 4: "W"}}


def _auto(value):
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return {i: torch.export.Dim.AUTO for i in range(value.dim())}
    if isinstance(value, dict):
        return {k: _auto(v) for k, v in value.items()}
    return None


def _symbol_names(named: NamedModel, ep) -> dict[sympy.Symbol, sympy.Symbol]:
    """Map export's symbols (s0, s13, ...) to B, H, W, T, F, L by the input dimension they first appear in."""
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    user = [name for name in ep.graph_signature.user_inputs if isinstance(values.get(name), torch.Tensor)]
    names: dict[sympy.Symbol, sympy.Symbol] = {}

    def name(dim, label: str) -> None:
        if isinstance(dim, torch.SymInt):
            expr = sympy.sympify(dim.node.expr)
            if isinstance(expr, sympy.Symbol) and expr not in names:
                names[expr] = sympy.Symbol(label)

    latents = next((u for u in user if u.endswith(named.latents) or named.latents in u), None)
    if latents is not None:
        shape = values[latents].shape
        name(shape[0], "B")
        for d, label in LATENT_DIM_NAMES.get(len(shape), {}).items():
            name(shape[d], label)
    for u in user:
        shape = values[u].shape
        name(shape[0], "B")
        if u != latents and len(shape) == 3:
            name(shape[1], "L")
    return names


def symbolic_flops(named: NamedModel) -> dict[str, str] | str:
    """Region FLOPs as sympy expressions (see the module docstring), or the reason there are none."""
    shapes = {k: _auto(v) for k, v in named.inputs.items()}
    kwargs = dict(named.inputs)
    if named.diffusers:
        kwargs["return_dict"], shapes["return_dict"] = False, None
    try:
        ep = torch.export.export(named.model, (), kwargs, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - any export failure only costs the symbolic column
        return f"no dynamic export ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    sig = ep.graph_signature
    structure = analyse(ep.graph_module, set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
                        | set(sig.inputs_to_lifted_tensor_constants))
    names = _symbol_names(named, ep)
    out = {}
    for r in structure.regions:
        expr = sympy.sympify(cost.graph_flops(r.nodes)).subs(names)
        out[r.name] = str(sympy.factor(expr))
    return out
