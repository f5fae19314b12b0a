"""Benchmark the ditfx fused kernels against eager PyTorch and torch.compile (Inductor).

For every op in ``ditfx.kernels.KERNELS``, each of its argument variants, dtype and DiT-XL/2
shape (width 1152; 256 tokens is 256x256 images, 1024 is 512x512, 4096 is 1024x1024), three
implementations are timed with ``triton.testing.do_bench`` (median of its repetitions):

- ``eager``: the op's reference (plain PyTorch, float32 math) run eagerly;
- ``inductor``: the same reference under ``torch.compile`` (Inductor, static shapes);
- ``ditfx``: the registered op, which launches the Triton kernel on CUDA tensors.

Every op is memory-bound, so the report is bandwidth: bytes read and written (tensor inputs plus
outputs) per second, and that as a fraction of a measured device-to-device copy. Before timing,
the ditfx output is checked against the reference.

Usage::

    python benchmarks/kernel_ops.py                          # full sweep, table on stdout
    python benchmarks/kernel_ops.py --ops adaln_modulate --dtypes bfloat16 --batch 2 --tokens 1024
    python benchmarks/kernel_ops.py --json results.json      # also JSON (``--json`` alone: stdout)

Without a CUDA device it prints a message and exits with status 0.
"""

import argparse
import json
import platform
import sys

import torch

from ditfx.kernels import KERNELS
from ditfx.kernels.adaln_modulate import adaln_modulate_reference
from ditfx.kernels.cache_residual import cache_residual_reference
from ditfx.kernels.gated_residual import gated_residual_reference
from ditfx.kernels.testing import VARIANTS, assert_close, make_inputs

REFERENCES = {
    "adaln_modulate": adaln_modulate_reference,
    "gated_residual": gated_residual_reference,
    "cache_residual": cache_residual_reference,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--width", type=int, default=1152)
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write results as JSON to PATH, or to stdout when PATH is omitted",
    )
    return p.parse_args(argv)


def nbytes(tensors) -> int:
    """Bytes of the tensors among ``tensors`` (nested tuples allowed)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (tuple, list)):
        return sum(nbytes(t) for t in tensors)
    return 0


def copy_bandwidth(do_bench) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write bytes), the roofline for these ops."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes(src) / (ms * 1e-3) / 1e9


def bench_case(op, variant, dtype, batch, tokens, width, do_bench, copy_gbps) -> list[dict]:
    args = make_inputs(op, variant, batch, tokens, width, dtype, device="cuda")
    reference = REFERENCES[op]
    impls = {
        "eager": reference,
        "inductor": torch.compile(reference, dynamic=False),
        "ditfx": KERNELS[op],
    }
    out = impls["ditfx"](*args)
    expected = reference(*args)
    outs, expecteds = (o if isinstance(o, tuple) else (o,) for o in (out, expected))
    for a, e in zip(outs, expecteds, strict=True):
        assert_close(a, e)
    moved = nbytes(args) + nbytes(out)

    rows = []
    for impl, fn in impls.items():
        fn(*args)  # compile (Inductor) and autotune outside the timed region
        ms = do_bench(lambda fn=fn: fn(*args), return_mode="median")
        gbps = moved / (ms * 1e-3) / 1e9
        rows.append(
            {
                "op": op,
                "variant": variant,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": batch,
                "tokens": tokens,
                "width": width,
                "impl": impl,
                "ms": ms,
                "bytes": moved,
                "gbps": gbps,
                "copy_fraction": gbps / copy_gbps,
            }
        )
    return rows


def print_table(rows: list[dict], file) -> None:
    header = (
        f"{'op':16} {'variant':12} {'dtype':9} {'B':>2} {'T':>5} {'impl':9} "
        f"{'ms':>9} {'GB/s':>8} {'of copy':>8}"
    )
    print(header, file=file)
    for r in rows:
        print(
            f"{r['op']:16} {r['variant']:12} {r['dtype']:9} {r['batch']:>2} {r['tokens']:>5} "
            f"{r['impl']:9} {r['ms']:9.4f} {r['gbps']:8.1f} {r['copy_fraction']:8.1%}",
            file=file,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernel_ops.py: no CUDA device found; the Triton kernels need an NVIDIA "
            "GPU, so nothing was benchmarked.",
            file=sys.stderr,
        )
        return 0
    # Imported after the CUDA check: triton is a Linux-only dependency.
    import triton
    from triton.testing import do_bench

    # One static-shape compile per case; the default recompile limit would fall back to eager.
    torch._dynamo.config.recompile_limit = 10_000
    copy_gbps = copy_bandwidth(do_bench)
    rows = []
    for op in args.ops:
        for variant in VARIANTS[op]:
            for dtype in (DTYPES[d] for d in args.dtypes):
                for batch in args.batch:
                    for tokens in args.tokens:
                        rows += bench_case(
                            op, variant, dtype, batch, tokens, args.width, do_bench, copy_gbps
                        )

    # With JSON on stdout, the table goes to stderr so stdout stays parseable.
    print_table(rows, sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "copy_gbps": copy_gbps,
            "results": rows,
        }
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
