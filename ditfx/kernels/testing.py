"""Inputs and tolerances shared by the kernel tests and ``benchmarks/kernel_ops.py``.

Keeping the input factory here (as Liger-Kernel's benchmarks import their tests' baselines)
means the tests and the benchmark exercise the same argument layouts.
"""

import torch

#: Broadcast / argument variants each op is tested and benchmarked with.
VARIANTS = {
    "adaln_modulate": ("per_sample", "per_token"),
    "gated_residual": ("per_sample", "per_token"),
    "cache_residual": ("full",),
}

#: (atol, rtol) for an output in the given dtype against a float64 oracle. 16-bit outputs are
#: computed in float32 and rounded once, so half an ulp (2^-11 fp16, 2^-8 bf16) bounds the error.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def make_inputs(
    op: str,
    variant: str,
    batch: int,
    tokens: int,
    width: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple:
    """Positional arguments for ``KERNELS[op]`` at shape ``(batch, tokens, width)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, tokens, width)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=g).to(device=device, dtype=dtype)

    per_token = variant == "per_token"
    mod_shape = shape if per_token else (batch, width)
    if op == "adaln_modulate":
        return randn(*shape), randn(*mod_shape), randn(*mod_shape), 1e-6
    if op == "gated_residual":
        return randn(*shape), randn(*mod_shape), randn(*shape)
    if op == "cache_residual":
        return randn(*shape), randn(*shape), randn(*shape)
    raise KeyError(f"unknown op {op!r}")


def to_float64(args: tuple) -> tuple:
    """Cast the floating tensors in ``args`` to float64 (references then compute in float64)."""
    return tuple(
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    """Compare with an oracle within :data:`TOLERANCES` of ``dtype`` (default: actual's dtype)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def assert_compiles(fn, args: tuple) -> None:
    """``torch.compile(fn, backend="aot_eager", fullgraph=True)`` runs and matches eager ``fn``."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args))


def assert_export_keeps_op(module: torch.nn.Module, args: tuple, op: str) -> None:
    """``torch.export.export(module, args)`` keeps ``torch.ops.ditfx.<op>`` and matches eager."""
    program = torch.export.export(module, args)
    target = getattr(torch.ops.ditfx, op).default
    assert any(node.target is target for node in program.graph.nodes), program.graph
    torch.testing.assert_close(program.module()(*args), module(*args))
