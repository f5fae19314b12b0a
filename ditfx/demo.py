"""``ditfx demo``: the shipped digits DiT sampled with and without ditfx from the same seeds.

Writes both sample grids as one PNG and prints a table (steps, network evaluations, block evaluations, FLOPs,
wall time, speed-up, digits-FD, class accuracy, PSNR against the baseline); ``--json`` prints it as JSON.
The baseline is the unchanged diffusers pipeline in eager mode; ditfx runs the same pipeline after
``ditfx.optimize(pipe, config)``: the shipped static block-cache schedule (blocks recomputed together, reused
values forecast linearly) and Adaptive Guidance. Compilation
happens in a first, identical generation; its extra time is reported separately. The last row is the shipped
4-step ARD student (``--student ard``; history attention, no guidance), distilled from this pipeline at guidance
1.5 and 50 steps (docs/history.md): the same labels and noise, 4 network evaluations.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: Static-cache threshold of the demo (blocks together, linear forecast): inside the peers benchmark's quality
#: budget on the digits model (PSNR >= 30 dB against the baseline, digits-FD within 10 %); see docs/benchmarks.md.
DEMO_DELTA = 0.5
#: Adaptive Guidance's threshold in the demo (the default), with fill="delta": a switched sample keeps its last
#: guidance direction, fading with t, which keeps digits-FD and accuracy on the digits model (docs/guidance.md).
DEMO_GAMMA = 0.99


@dataclass(frozen=True)
class DemoSettings:
    per_class: int = 8
    steps: int = 50
    guidance_scale: float = 1.5
    seed: int = 0
    delta: float = DEMO_DELTA
    gamma: float | None = DEMO_GAMMA  # None: no guidance skipping
    compiler: str = "inductor"
    out: str = "ditfx_demo.png"
    student: str | None = "ard"  # the distilled few-step student of the last row (None: no such row)
    package: str | None = None  # run the ditfx row from this exported package (ditfx export digits PATH --demo)

    def __post_init__(self):
        if self.per_class < 2:
            raise ValueError(f"per_class must be >= 2 (digits-FD needs several samples per class), got "
                             f"{self.per_class}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.student not in (None, "ard", "step"):
            raise ValueError(f"student must be 'ard', 'step' or None, got {self.student!r}")
        if not self.out.endswith(".png"):
            raise ValueError(f"out must be a .png path, got {self.out!r}")


def demo_config(settings: DemoSettings):
    """What the demo turns on: the shipped static block-cache schedule, its blocks recomputed together and
    their reused residuals forecast linearly, and Adaptive Guidance with a fading guidance after the switch."""
    from ditfx.cache.config import StaticCache
    from ditfx.config import Config
    from ditfx.guidance.config import AdaptiveGuidance
    from ditfx.models.digits.calibrate import shipped_schedule_path

    cache = StaticCache(settings.delta, shipped_schedule_path(), per_block=False, forecast="linear")
    return Config(cache=cache,
                  guidance=AdaptiveGuidance(settings.gamma, fill="delta") if settings.gamma is not None else None,
                  compiler=settings.compiler)


def flops_per_call(transformer, batch: int) -> int:
    """FLOPs of one denoiser call at ``batch`` rows, counted by torch.utils.flop_counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformer.config
    x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    # The counter has no formula for CPU's fused attention kernel; the math backend's matmuls it does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        transformer(hidden_states=x, timestep=torch.ones(batch), class_labels=torch.zeros(batch, dtype=torch.long),
                    return_dict=False)
    return counter.get_total_flops()


def _bar(desc: str) -> dict:
    return {"desc": desc, "file": sys.stderr, "leave": False, "unit": "step"}


def run_demo(settings: DemoSettings = DemoSettings()) -> dict:
    """Sample both ways, measure, write the PNG; returns the table as a dict."""
    import ditfx.api as api
    from ditfx.models import digits
    from ditfx.models.digits.sampling import class_grid, generate

    config = demo_config(settings)  # bad settings fail here, before any sampling
    labels = class_grid(settings.per_class)
    n, steps = len(labels), settings.steps
    cfg_rows = 2 if settings.guidance_scale > 1 else 1

    packaged = _package_pipeline(settings, cfg_rows * n) if settings.package is not None else None
    baseline_model = digits.load_transformer()
    start = time.perf_counter()
    baseline = generate(baseline_model, labels, steps, settings.guidance_scale, settings.seed,
                        progress=_bar("diffusers (eager)"))
    baseline_s = time.perf_counter() - start
    n_blocks = len(baseline_model.transformer_blocks)

    guided = config.guidance is not None
    if packaged is not None:
        pipe, guided, config = packaged
    else:
        pipe = digits.pipeline()
        api.optimize(pipe, config)
    start = time.perf_counter()
    # An identical first generation compiles every region at every batch size the run needs (guidance
    # skipping computes fewer rows once samples switch); the second one is timed.
    with api.generation(pipe):
        generate(pipe.transformer, labels, steps, settings.guidance_scale, settings.seed,
                 progress=_bar("ditfx: compiling"))
    warm_s = time.perf_counter() - start
    api.reset_stats(pipe)
    start = time.perf_counter()
    with api.generation(pipe):
        fast = generate(pipe.transformer, labels, steps, settings.guidance_scale, settings.seed,
                        progress=_bar("ditfx"))
    fast_s = time.perf_counter() - start
    compile_s = max(0.0, warm_s - fast_s)
    stats = api.stats(pipe)
    nfe = stats.nfe if guided else cfg_rows * stats.calls

    base_metrics = digits.metrics(baseline, labels)
    fast_metrics = digits.metrics(fast, labels, reference=baseline)
    call_flops = flops_per_call(baseline_model, cfg_rows * n)
    rows = [
        {"method": "diffusers (eager)", "steps": steps, "nfe": cfg_rows * steps, "block_evals": n_blocks * steps,
         "flops": call_flops * steps, "wall_s": baseline_s, "compile_s": 0.0, "speedup": 1.0,
         "fd": base_metrics["fd"], "accuracy": base_metrics["accuracy"], "psnr": None},
        {"method": "ditfx" if settings.package is None else "ditfx (package)", "steps": stats.steps, "nfe": nfe,
         "block_evals": stats.block_evals,
         "flops": stats.flops, "wall_s": fast_s, "compile_s": compile_s, "speedup": baseline_s / fast_s,
         "fd": fast_metrics["fd"], "accuracy": fast_metrics["accuracy"], "psnr": fast_metrics["psnr"]},
    ]
    if settings.student is not None:
        rows.append(_student_row(settings, labels, baseline, baseline_s))
    png = write_grids(Path(settings.out), baseline, fast, settings.per_class,
                      ["diffusers (eager)", f"ditfx ({rows[1]['speedup']:.2f}x)"])
    return {"settings": settings.__dict__, "config": config if isinstance(config, str) else repr(config),
            "png": str(png), "samples": n, "rows": rows,
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.is_available()}}


def _package_pipeline(settings: DemoSettings, rows: int):
    """The digits pipeline whose transformer is the exported package, whether it skips guidance, and its config
    (the package's)."""
    import ditfx.api as api
    from ditfx.guidance.config import AdaptiveGuidance, GuidanceWindow, LinearAG
    from ditfx.models import digits
    from ditfx.package.loaded import load

    _check_digits_package(Path(settings.package))
    transformer = load(settings.package)
    exported = transformer.call_spec.tensors.get("hidden_states", {}).get("shape", [None])[0]
    if exported != rows:
        raise ValueError(f"the package {settings.package} was exported for calls of {exported} rows; this demo makes "
                         f"calls of {rows} (--per-class {settings.per_class}, guidance scale "
                         f"{settings.guidance_scale}): export it with `ditfx export digits PATH --demo "
                         f"--per-class {settings.per_class}`")
    guided = any(isinstance(c, AdaptiveGuidance | GuidanceWindow | LinearAG)
                 for c in transformer.executor.plan.policies)
    pipe = api.optimize(digits.DigitsPipeline(transformer, digits.make_scheduler()))  # binds its scheduler
    return pipe, guided, transformer.manifest.get("config", "unknown")


def _check_digits_package(path: Path) -> None:
    """Refuse, before loading it, a package of another model than the shipped digits DiT, the one the demo samples."""
    from ditfx.models import digits
    from ditfx.package import manifest as manifest_io
    from ditfx.package.call import CallSpec

    manifest = manifest_io.read_fields(path)
    call = CallSpec.read(manifest_io.PackageFile(path / "call.json", manifest["ditfx"]))
    model = digits.load_transformer()
    expected = json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))
    config = call.config or {}
    differs = [f"{k} {config.get(k)!r}" for k in expected if config.get(k) != expected[k]]
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if manifest["model_class"] != model_class:
        what = f"its manifest.json names the model {manifest['model_class']}"
    elif differs:
        what = (f"its call.json holds a {type(model).__name__} of another config than the digits DiT "
                f"({', '.join(differs[:4])})")
    else:
        return
    raise ValueError(f"{path} is not the digits demo package: {what}. The demo samples the shipped digits DiT: make "
                     "its package with `ditfx export digits PATH --demo`")


def _student_row(settings: DemoSettings, labels, baseline: torch.Tensor, baseline_s: float) -> dict:
    """The distilled student from the same labels and noise, compiled like the ditfx row (its first generation),
    its second generation timed."""
    import ditfx.api as api
    from ditfx.models import digits

    pipe = digits.pipeline(student=settings.student, compiler=settings.compiler)
    start = time.perf_counter()
    pipe.set_progress_bar_config(**_bar(f"{settings.student} student: compiling"))
    pipe(labels, generator=torch.Generator().manual_seed(settings.seed))
    warm_s = time.perf_counter() - start
    api.reset_stats(pipe)
    pipe.set_progress_bar_config(**_bar(f"{settings.student} student"))
    start = time.perf_counter()
    images = pipe(labels, generator=torch.Generator().manual_seed(settings.seed)).images
    wall_s = time.perf_counter() - start
    stats = api.stats(pipe)
    q = digits.metrics(images, labels, reference=baseline)
    return {"method": f"ditfx {settings.student} student", "steps": stats.steps, "nfe": float(stats.calls),
            "block_evals": stats.block_evals, "flops": stats.flops, "wall_s": wall_s,
            "compile_s": max(0.0, warm_s - wall_s), "speedup": baseline_s / wall_s, "fd": q["fd"],
            "accuracy": q["accuracy"], "psnr": q["psnr"]}


def write_grids(path: Path, left: torch.Tensor, right: torch.Tensor, per_class: int, titles: list[str],
                scale: int = 4) -> Path:
    """Two digit grids (one row per class) side by side under their titles, as one PNG."""
    from PIL import Image, ImageDraw

    def grid(images: torch.Tensor) -> Image.Image:
        pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 16, 16)
        pixels = torch.nn.functional.pad(pixels, (1, 1, 1, 1), value=96)  # a grey frame keeps cells apart
        size = pixels.shape[-1]
        rows = pixels.view(-1, per_class, size, size)  # (classes, per_class, 16, 16)
        sheet = rows.permute(0, 2, 1, 3).reshape(rows.shape[0] * size, per_class * size)
        image = Image.fromarray(sheet.numpy(), mode="L")
        return image.resize((image.width * scale, image.height * scale), Image.NEAREST)

    panels = [grid(left), grid(right)]
    gap, header = 12, 20
    width = sum(p.width for p in panels) + gap * 3
    canvas = Image.new("L", (width, panels[0].height + header + gap), color=255)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for panel, title in zip(panels, titles):
        draw.text((x, 4), title, fill=0)
        canvas.paste(panel, (x, header))
        x += panel.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def format_table(result: dict) -> str:
    head = f"{'':<19}{'steps':>6}{'NFE':>6}{'blocks':>8}{'GFLOPs':>9}{'wall s':>8}{'speed-up':>9}" \
           f"{'FD':>8}{'acc %':>7}{'PSNR dB':>9}"
    lines = [head]
    for r in result["rows"]:
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(f"{r['method']:<19}{r['steps']:>6}{r['nfe']:>6.1f}{r['block_evals']:>8}{r['flops'] / 1e9:>9.1f}"
                     f"{r['wall_s']:>8.1f}{r['speedup']:>8.2f}x{r['fd']:>8.1f}{100 * r['accuracy']:>7.1f}{psnr:>9}")
    fast = result["rows"][1]
    lines.append(f"\n{result['samples']} samples, same seeds; ditfx compiled in {fast['compile_s']:.1f} s "
                 f"(not in its wall time). Grids: {result['png']}")
    if len(result["rows"]) > 2:
        student, settings = result["rows"][2], result["settings"]
        same = settings["guidance_scale"] == 1.5 and settings["steps"] == 50
        lines.append(f"The {settings['student']} student (compiled in {student['compile_s']:.1f} s) was distilled "
                     f"from guidance 1.5 at 50 steps{'' if same else ', not this setting'}: docs/history.md.")
    return "\n".join(lines)


def main(args) -> int:
    settings = DemoSettings(per_class=args.per_class, steps=args.steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, delta=args.delta, gamma=args.gamma, compiler=args.compiler, out=args.out,
                            student=None if args.student == "none" else args.student, package=args.package)
    result = run_demo(settings)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def add_arguments(p) -> None:
    d = DemoSettings()
    p.add_argument("--per-class", type=int, default=d.per_class, help="samples of each digit")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--delta", type=float, default=d.delta, help="StaticCache delta")
    p.add_argument("--gamma", type=float, default=d.gamma, help="AdaptiveGuidance gamma")
    p.add_argument("--no-guidance-skipping", dest="gamma", action="store_const", const=None,
                   help="turn Adaptive Guidance off")
    p.add_argument("--compiler", default=d.compiler, help="ditfx's inner backend (inductor, aot_eager, eager)")
    p.add_argument("--out", default=d.out, help="PNG with both grids")
    p.add_argument("--student", choices=["ard", "step", "none"], default=d.student,
                   help="the distilled 4-step student of the last row (none: no such row)")
    p.add_argument("--package", help="run the ditfx row from this package (`ditfx export digits PATH --demo`) "
                                     "instead of compiling in the process")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
