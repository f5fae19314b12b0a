"""The kernel part of ``ditfx inspect``: which nodes the fusion pass lowered to which kernel, and
the Triton source of each kernel (``--kernels``, ``--kernel-source NAME``)."""
from __future__ import annotations

from dataclasses import asdict

from ditfx.kernels.lowering.fusion import FusionReport


def kernel_section(reports: list) -> dict | None:
    """The fusion pass's sites per region and its kernel sources, or None when it did not run."""
    fusion = next((r for r in reports if isinstance(r, FusionReport)), None)
    if fusion is None:
        return None
    return {
        "sites": {region: [asdict(s) for s in sites] for region, sites in fusion.sites.items()},
        "not_lowered": fusion.not_lowered,
        "kernels": fusion.kernel_counts(),
        "sources": fusion.sources,
    }


def format_kernels(section: dict) -> list[str]:
    total = sum(section["kernels"].values())
    lines = [f"kernels (fusion pass): {total} site(s) lowered"]
    rows = [(region, s) for region, sites in section["sites"].items() for s in sites]
    w_region = max([len(r) for r in [*section["sites"], *section["not_lowered"]]], default=0) + 2
    w_kernel = max([len(s["kernel"]) for _, s in rows], default=0) + 2
    w_expr = max([len(s["expression"]) for _, s in rows], default=0) + 2
    for region, s in rows:
        lines.append(f"  {region:<{w_region}}{s['kernel']:<{w_kernel}}{s['expression']:<{w_expr}}"
                     f"{', '.join(s['nodes'])}")
    for region, reasons in section["not_lowered"].items():
        lines.extend(f"  {region:<{w_region}}not lowered: {why}" for why in reasons)
    lines.append("  (symbols: x the normalised input, y full (B, T, D), m per sample, t per token, c scalar; "
                 "--kernel-source NAME prints a kernel's source)")
    return lines


def kernel_source(section: dict | None, name: str) -> str:
    """The source of the kernel called ``name`` (or the only one whose name starts with it)."""
    sources = (section or {}).get("sources", {})
    found = [k for k in sources if k == name] or [k for k in sources if k.startswith(name)]
    if len(found) != 1:
        known = ", ".join(sources) or "none (no site was lowered)"
        why = "is ambiguous" if found else "is not a kernel of this model"
        raise ValueError(f"{name!r} {why}; kernels: {known}")
    return sources[found[0]]
