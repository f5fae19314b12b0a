"""ditfx against its peers on the digits DiT: speed-up at matched quality, one run, same seeds.

Every method generates the same images (the digits pipeline, batched classifier-free guidance, 50 Euler steps,
seed 0) and is compared with the eager uncached pipeline: wall time (speed-up = eager wall / method wall), and
quality from ``digits.metrics`` against the baseline images (PSNR, SSIM) and against held-out real digits
(digits-FD, class accuracy). Methods (see ``METHODS``): eager, torch.compile, diffusers' cache hooks
(FirstBlockCache, TaylorSeerCache, MagCache, FasterCache, PyramidAttentionBroadcast, SeaCache), cache-dit
(DBCache F1B0, with its TaylorSeer calibrator, with a static step mask), each peer also under torch.compile,
and ditfx's dynamic and static block caching. Each method sweeps its knob; the report gives per method the
Pareto front of (speed-up, PSNR, |FD - FD_baseline|) and the best speed-up inside the quality budget (PSNR >=
30 dB against the baseline and digits-FD within 10 % of the baseline's).

Timing: each setting runs one generation after its warm-up. Compiled settings warm up with one full
generation, whose time is reported as ``warmup_s``; ``compile_s`` = warmup_s - wall_s estimates their one-time
compilation. Each method runs in its own subprocess (peers patch classes and global compiler settings), so a
crash or a patched class cannot leak into the next method.

    python benchmarks/peers.py --json out/peers.json           # full run: hours on 2 shared CPU cores
    python benchmarks/peers.py --quick --json out/peers_quick.json   # smoke run: minutes
    python benchmarks/peers.py --methods "ditfx*" "diffusers FirstBlockCache*" --json out/some.json

cache-dit is optional (``pip install -e ".[bench]"``); without it its entries report the import error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Pure helpers (no torch): the quality budget, Pareto fronts, summaries. Tested in tests/benchmarks/.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A setting is inside the budget when its PSNR against the baseline images is at least ``min_psnr`` and its
    digits-FD is within ``fd_tolerance`` (relative) of the baseline's: on either side (``fd_side="both"``, the
    issue's "within 10 % of the baseline's": the output distribution stays the baseline's), or only not above it
    (``"upper"``: an FD below the baseline's counts as no loss)."""

    min_psnr: float = 30.0
    fd_tolerance: float = 0.10
    fd_side: str = "both"

    def __post_init__(self):
        if self.fd_side not in ("both", "upper"):
            raise ValueError(f"fd_side must be 'both' or 'upper', got {self.fd_side!r}")

    def fd_gap(self, fd: float, baseline_fd: float) -> float:
        """|fd - fd_baseline| / fd_baseline (the Pareto objective, whatever the side)."""
        return abs(fd - baseline_fd) / baseline_fd

    def admits(self, point: dict, baseline_fd: float) -> bool:
        if point.get("error") or point.get("psnr") is None or point.get("fd") is None:
            return False
        excess = (point["fd"] - baseline_fd) / baseline_fd
        if self.fd_side == "both":
            excess = abs(excess)
        return point["psnr"] >= self.min_psnr and excess <= self.fd_tolerance + 1e-12

    def to_dict(self) -> dict:
        fd_rule = (f"|fd - fd_baseline| <= {self.fd_tolerance:g} * fd_baseline" if self.fd_side == "both"
                   else f"fd <= {1 + self.fd_tolerance:g} * fd_baseline")
        return {"min_psnr_db": self.min_psnr, "fd_tolerance": self.fd_tolerance, "fd_side": self.fd_side,
                "rule": f"psnr >= {self.min_psnr} dB against the baseline images and {fd_rule}"}


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b in speed-up (higher), PSNR (higher) and FD gap (lower), and better in one."""
    ge = a["speedup"] >= b["speedup"] and a["psnr"] >= b["psnr"] and a["fd_gap"] <= b["fd_gap"]
    gt = a["speedup"] > b["speedup"] or a["psnr"] > b["psnr"] or a["fd_gap"] < b["fd_gap"]
    return ge and gt


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """The points no other point dominates (speed-up up, PSNR up, FD gap down), fastest first. Points with an
    error or without the three values are left out."""
    valid = [p for p in points if not p.get("error")
             and all(isinstance(p.get(k), (int, float)) for k in ("speedup", "psnr", "fd_gap"))]
    front = [p for p in valid if not any(dominates(q, p) for q in valid if q is not p)]
    return sorted(front, key=lambda p: (-p["speedup"], -p["psnr"]))


def best_in_budget(points: Sequence[dict], budget: Budget, baseline_fd: float) -> dict | None:
    """The fastest point inside the budget, or None."""
    inside = [p for p in points if budget.admits(p, baseline_fd) and isinstance(p.get("speedup"), (int, float))]
    return max(inside, key=lambda p: p["speedup"]) if inside else None


def near_budget_values(values: Sequence, points: Sequence[dict]) -> list:
    """Knob values worth repeating under torch.compile, from the eager run of the same method: the values whose
    eager point was inside the budget plus the next one beyond the last of them (sweeps go from conservative
    to aggressive); the first value when none was inside."""
    inside = [i for i, p in enumerate(points) if p.get("in_budget")]
    if not inside:
        return list(values[:1])
    keep = sorted(set(inside) | {max(inside) + 1})
    return [values[i] for i in keep if i < len(values)]


def summarize(points: list[dict], budget: Budget, baseline_fd: float) -> dict:
    """best_speedup_in_budget, best_setting and the Pareto front of one method's points; the same best by CPU
    time (``cpu_speedup``), which other jobs on a shared machine disturb less than wall time."""
    best = best_in_budget(points, budget, baseline_fd)
    by_cpu = [{**p, "speedup": p["cpu_speedup"]} for p in points if isinstance(p.get("cpu_speedup"), (int, float))]
    best_cpu = best_in_budget(by_cpu, budget, baseline_fd)
    front = pareto_front(points)
    return {
        "best_speedup_in_budget": None if best is None else best["speedup"],
        "best_setting": None if best is None else best["knob"],
        "best_point": best,
        "best_cpu_speedup_in_budget": None if best_cpu is None else best_cpu["speedup"],
        "best_cpu_setting": None if best_cpu is None else best_cpu["knob"],
        "pareto": [{k: p.get(k) for k in ("knob", "speedup", "cpu_speedup", "psnr", "fd", "fd_gap", "ssim",
                                          "accuracy")} for p in front],
    }


def compare(methods: dict[str, dict], key: str = "best_speedup_in_budget") -> dict:
    """ditfx's best against the best peer (everything but ditfx and the eager baseline) by ``key``."""
    ditfx = [(m[key], n) for n, m in methods.items() if m.get("family") == "ditfx" and m.get(key) is not None]
    peers = [(m[key], n) for n, m in methods.items()
             if m.get("family") not in ("ditfx", "baseline") and m.get(key) is not None]
    best_ditfx = max(ditfx, default=(None, None))
    best_peer = max(peers, default=(None, None))
    return {"ditfx": best_ditfx[0], "ditfx_method": best_ditfx[1], "best_peer": best_peer[0],
            "best_peer_method": best_peer[1],
            "ditfx_beats_every_peer": None if best_ditfx[0] is None else
            (best_peer[0] is None or best_ditfx[0] > best_peer[0])}


def knob_label(knob: Any) -> str:
    if knob is None:
        return "-"
    if isinstance(knob, dict):
        return ",".join(f"{k}={v}" for k, v in knob.items())
    return str(knob)


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(report: dict) -> str:
    """The summary table: one row per method, its fastest setting inside the budget (by wall time) and its
    best CPU-time speed-up inside the budget."""
    rows = [("method", "speed-up in budget", "setting", "PSNR dB", "FD", "acc", "compile s", "CPU speed-up",
             "points")]
    for name, m in report["methods"].items():
        if m.get("error"):
            rows.append((name, "error", (m["error"] or "").splitlines()[0][:60], "", "", "", "", "", "0"))
            continue
        best = m.get("best_point")
        cpu = _fmt(m.get("best_cpu_speedup_in_budget"), ".2f")
        if not best:
            rows.append((name, "none in budget", "-", "", "", "", "", cpu, str(len(m.get("points", [])))))
            continue
        rows.append((name, _fmt(m.get("best_speedup_in_budget"), ".2f"), knob_label(m.get("best_setting")),
                     _fmt(best.get("psnr"), ".1f", "inf"), _fmt(best.get("fd"), ".1f"),
                     _fmt(best.get("accuracy"), ".2f"), _fmt(best.get("compile_s"), ".1f"), cpu,
                     str(len(m.get("points", [])))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_points(name: str, points: list[dict]) -> str:
    lines = [f"{name}:"]
    for p in points:
        if p.get("error"):
            lines.append(f"  {knob_label(p.get('knob')):<28} error: {p['error'][:100]}")
            continue
        compile_s = "" if p.get("compile_s") is None else f"  compile {p['compile_s']:.1f} s"
        lines.append(f"  {knob_label(p.get('knob')):<28} x{p['speedup']:.2f}  wall {p['wall_s']:.1f} s{compile_s}"
                     f"  psnr {_fmt(p['psnr'], '.1f', 'inf')}  fd {p['fd']:.1f}  acc {p['accuracy']:.2f}"
                     f"{'  (in budget)' if p.get('in_budget') else ''}")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The report as Markdown tables (docs/benchmarks.md): best speed-up in budget per method, the overall Pareto
    front, and every measured point."""

    def cell(v, spec=".2f", none="-"):
        return _fmt(v, spec, none)

    out = [("| method | best speed-up in budget | setting | CPU-time speed-up in budget | PSNR dB | SSIM | digits-FD "
            "| accuracy | compile s |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        if m.get("error"):
            first = (m["error"] or "").splitlines()[0]
            out.append(f"| {name} | error | `{first[:110]}` | | | | | | |")
            continue
        b = m.get("best_point")
        if not b:
            out.append(f"| {name} | none in budget | | {cell(m.get('best_cpu_speedup_in_budget'))} | | | | | |")
            continue
        out.append(f"| {name} | **{cell(m['best_speedup_in_budget'])}** | {knob_label(m['best_setting'])} | "
                   f"{cell(m.get('best_cpu_speedup_in_budget'))} | {cell(b.get('psnr'), '.1f', 'inf')} | "
                   f"{cell(b.get('ssim'), '.3f')} | {cell(b.get('fd'), '.1f')} | {cell(b.get('accuracy'), '.2f')} | "
                   f"{cell(b.get('compile_s'), '.1f')} |")
    confirmation = report.get("confirmation")
    if confirmation:
        out += ["", (f"Confirmation: the best in-budget setting re-timed in {confirmation['rounds_requested']} "
                     "interleaved rounds, each against an eager run of its own round (median; all rounds listed):"),
                "",
                "| method | setting | median speed-up | median CPU-time speed-up | speed-ups | CPU-time speed-ups |",
                "|---|---|---|---|---|---|"]
        for name, c in sorted(confirmation["methods"].items(), key=lambda kv: -(kv[1]["speedup_median"] or 0)):
            out.append(f"| {name} | {knob_label(c['knob'])} | **{cell(c['speedup_median'])}** | "
                       f"{cell(c['cpu_speedup_median'])} | {', '.join(cell(x) for x in c['speedups'])} | "
                       f"{', '.join(cell(x) for x in c['cpu_speedups'])} |")
    out += ["", "Pareto front over all methods (speed-up up, PSNR up, |FD - FD_baseline| down):", "",
            "| method | setting | speed-up | CPU-time speed-up | PSNR dB | digits-FD | FD gap | in budget |",
            "|---|---|---|---|---|---|---|---|"]
    budget = Budget(report["budget"]["min_psnr_db"], report["budget"]["fd_tolerance"],
                    report["budget"].get("fd_side", "both"))
    for p in report.get("pareto", []):
        psnr = math.inf if p.get("psnr") is None else p["psnr"]
        inside = budget.admits({**p, "psnr": psnr}, report["baseline"]["fd"])
        out.append(f"| {p['method']} | {knob_label(p['knob'])} | {cell(p['speedup'])} | {cell(p.get('cpu_speedup'))} "
                   f"| {cell(psnr, '.1f', 'inf')} | {cell(p['fd'], '.1f')} | {cell(p['fd_gap'], '.3f')} | "
                   f"{'yes' if inside else 'no'} |")
    out += ["", "Every setting:", "",
            ("| method | setting | wall s | speed-up | CPU-time speed-up | compile s | PSNR dB | SSIM | digits-FD "
             "| accuracy | in budget |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        for p in m.get("points", []):
            if p.get("error"):
                out.append(f"| {name} | {knob_label(p.get('knob'))} | error | | | | | | | | |")
                continue
            out.append(f"| {name} | {knob_label(p.get('knob'))} | {cell(p.get('wall_s'), '.1f')} | "
                       f"{cell(p.get('speedup'))} | {cell(p.get('cpu_speedup'))} | {cell(p.get('compile_s'), '.1f')} | "
                       f"{cell(p.get('psnr'), '.1f', 'inf')} | {cell(p.get('ssim'), '.3f')} | "
                       f"{cell(p.get('fd'), '.1f')} | "
                       f"{cell(p.get('accuracy'), '.2f')} | {'yes' if p.get('in_budget') else 'no'} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Settings, generation, measurement
# --------------------------------------------------------------------------------------------------------------

POINT_TAG = "@@peers-point "
CALIBRATION_SEED = 1000  # calibrations (MagCache ratios, ditfx schedule) use other noise than the benchmark


@dataclass
class Context:
    """What a method's builder may use: the run settings and the results of its one-time preparation."""

    per_class: int
    steps: int
    guidance_scale: float
    seed: int
    compiler: str  # Inductor for the real run; aot_eager in --quick
    labels: Any = None
    prepared: dict = field(default_factory=dict)

    def generate(self, pipe, seed: int | None = None):
        """One generation with ``pipe``: (images, wall seconds, CPU seconds of this process)."""
        import torch

        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        cpu, wall = time.process_time(), time.perf_counter()
        images = pipe(class_labels=self.labels, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      generator=generator, output_type="pt").images
        return images, time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Built:
    """A ready pipeline; ``extras()`` adds method statistics after the timed run, ``close()`` undoes patches."""

    pipe: Any
    extras: Callable[[], dict] | None = None
    close: Callable[[], None] | None = None
    before_timed_run: Callable[[], None] | None = None


@dataclass
class Method:
    """One entry of the benchmark: a knob swept over ``values`` (conservative to aggressive); ``build(ctx, value)``
    returns a ready pipeline. ``prepare(ctx)`` runs once before the sweep (a calibration) and returns what the
    builder needs (kept in ``ctx.prepared[name]``) plus ``prepare_s``. A compiled method warms up with one
    generation per setting. ``follows``: the eager method whose in-budget knobs a compiled sweep repeats."""

    name: str
    family: str
    knob: str
    values: list
    build: Callable[[Context, Any], Built]
    compiled: bool = False
    prepare: Callable[[Context], dict] | None = None
    follows: str | None = None
    prepared_as: str | None = None  # the key its preparation is shared under (default: follows, else name)
    requires: str | None = None  # a module to import first (an optional dependency)
    notes: str = ""


def compiled_variant(method: Method, compile_fn: Callable[[Any, Context], None], how: str) -> Method:
    """The same method with its transformer compiled by ``compile_fn(pipe, ctx)`` after the method is applied."""

    def build(ctx: Context, value) -> Built:
        built = method.build(ctx, value)
        compile_fn(built.pipe, ctx)
        return built

    return Method(name=f"{method.name} + torch.compile", family=method.family, knob=method.knob,
                  values=method.values, build=build, compiled=True, prepare=method.prepare, follows=method.name,
                  requires=method.requires, notes=(method.notes + " " if method.notes else "") + how)


def _inductor_backend(ctx: Context) -> str:
    return "inductor" if ctx.compiler == "inductor" else ctx.compiler


def compile_transformer(pipe, ctx: Context) -> None:
    """torch.compile of the whole transformer, in place (Module.compile), default mode, graph breaks allowed."""
    pipe.transformer.compile(backend=_inductor_backend(ctx))


# ---- plain ---------------------------------------------------------------------------------------------------

def build_eager(ctx: Context, value) -> Built:
    from ditfx.models import digits

    return Built(digits.pipeline())


def build_torch_compile(ctx: Context, value) -> Built:
    from ditfx.models import digits

    pipe = digits.pipeline()
    compile_transformer(pipe, ctx)
    return Built(pipe)


# ---- diffusers cache hooks -----------------------------------------------------------------------------------

def cacheable_pipeline():
    """The digits pipeline whose transformer has diffusers' CacheMixin (``enable_cache``, ``cache_context``).

    diffusers 0.42.1's DiTTransformer2DModel does not inherit CacheMixin (the 30 cache-capable diffusers
    transformers do); the subclass adds only the mixin, the weights and the forward are the shipped model's."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.cache_utils import CacheMixin

    from ditfx.models import digits

    class CacheableDiTTransformer2DModel(DiTTransformer2DModel, CacheMixin):
        pass

    shipped = digits.load_transformer()
    model = CacheableDiTTransformer2DModel.from_config(shipped.config)
    model.load_state_dict(shipped.state_dict())
    return digits.DigitsPipeline(transformer=model.eval(), scheduler=digits.make_scheduler())


def hook_method(name: str, knob: str, values: list, make_config: Callable[[Any, Any, Context], Any],
                prepare: Callable[[Context], dict] | None = None, notes: str = "") -> Method:
    """A diffusers cache hook: ``make_config(value, pipe, ctx)`` gives the config for ``enable_cache``."""

    def build(ctx: Context, value) -> Built:
        pipe = cacheable_pipeline()
        pipe.transformer.enable_cache(make_config(value, pipe, ctx))
        return Built(pipe)

    return Method(name=f"diffusers {name}", family="diffusers", knob=knob, values=values, build=build,
                  prepare=prepare, notes=notes)


DIT_BLOCKS = r"transformer_blocks\.\d+"  # DiT's blocks; TaylorSeer's default patterns (".*attn") miss "attn1"


def prepare_mag_cache(ctx: Context) -> dict:
    """MagCache's calibration (its documented procedure): one uncached generation with ``calibrate=True`` prints
    the per-step magnitude ratios, which the real runs take as ``mag_ratios``."""
    from diffusers import MagCacheConfig

    pipe = cacheable_pipeline()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        ctx.generate(pipe, seed=CALIBRATION_SEED)
    match = re.search(r"Calibration Complete.*?\n(\[[^\]]*\])", out.getvalue(), re.DOTALL)
    if not match:
        raise RuntimeError(f"MagCache calibration printed no ratios: {out.getvalue()[-500:]!r}")
    return {"mag_ratios": json.loads(match.group(1)), "prepare_s": time.perf_counter() - start}


def diffusers_methods() -> list[Method]:
    import torch
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    def sea_vision(module, args, kwargs):
        # SeaCache's generic path: the visual latents of the output as (C, T, H, W); an image is one frame.
        return [x.unsqueeze(1) for x in kwargs["hidden_states"].unbind(0)]

    return [
        hook_method("FirstBlockCache", "threshold", [0.05, 0.08, 0.1, 0.12, 0.13, 0.14, 0.15],
                    lambda v, pipe, ctx: FirstBlockCacheConfig(threshold=v)),
        hook_method("TaylorSeerCache", "cache_interval", [5, 6, 7, 8, 12, 16, 20],
                    lambda v, pipe, ctx: TaylorSeerCacheConfig(
                        cache_interval=v, max_order=1, taylor_factors_dtype=torch.float32,
                        cache_identifiers=[DIT_BLOCKS]),
                    notes="Taylor prediction of whole block outputs (cache_identifiers = the DiT blocks, float32 "
                          "factors); the default identifiers '^transformer_blocks.*attn' do not fullmatch DiT's "
                          "'attn1' and would cache nothing."),
        hook_method("MagCache", "threshold", [0.02, 0.05, 0.1, 0.2],
                    lambda v, pipe, ctx: MagCacheConfig(
                        threshold=v, num_inference_steps=ctx.steps,
                        mag_ratios=ctx.prepared["diffusers MagCache"]["mag_ratios"]),
                    prepare=prepare_mag_cache,
                    notes="mag_ratios calibrated once on this pipeline (calibrate=True, seed 1000); "
                          "max_skip_steps 3 and retention_ratio 0.2 are the defaults."),
        hook_method("FasterCache", "unconditional_batch_skip_range", [2, 3, 5],
                    lambda v, pipe, ctx: FasterCacheConfig(
                        spatial_attention_block_skip_range=2, unconditional_batch_skip_range=v,
                        current_timestep_callback=lambda: pipe.current_timestep, tensor_format="BCHW",
                        _unconditional_conditional_input_kwargs_identifiers=[
                            "hidden_states", "timestep", "class_labels"]),
                    notes="attention reuse every 2nd step plus the unconditional half approximated from the "
                          "conditional one; DiT's batched inputs are hidden_states, timestep and class_labels."),
        hook_method("PyramidAttentionBroadcast", "spatial_attention_block_skip_range", [2, 3, 4],
                    lambda v, pipe, ctx: PyramidAttentionBroadcastConfig(
                        spatial_attention_block_skip_range=v, spatial_attention_timestep_skip_range=(100, 800),
                        current_timestep_callback=lambda: pipe.current_timestep)),
        hook_method("SeaCache", "threshold,max_consecutive_cached",
                    [{"threshold": 0.25, "max_consecutive_cached": 2}, {"threshold": 0.5, "max_consecutive_cached": 2},
                     {"threshold": 1.0, "max_consecutive_cached": 4}, {"threshold": 2.0, "max_consecutive_cached": 4},
                     {"threshold": 1.0, "max_consecutive_cached": 6}, {"threshold": 1.0, "max_consecutive_cached": 0},
                     {"threshold": 2.0, "max_consecutive_cached": 0}],
                    lambda v, pipe, ctx: SeaCacheConfig(raw_vision_callback=sea_vision, **v),
                    notes="generic path: raw_vision_callback gives each image as a one-frame (C, T, H, W) latent."),
    ]


# ---- cache-dit -----------------------------------------------------------------------------------------------

def cache_dit_method(name: str, knob: str, values: list, make: Callable[[Any, Context], tuple],
                     notes: str = "") -> Method:
    """cache-dit on the digits pipeline through cache-dit's own DiT adapter (the one it registers for diffusers'
    DiTPipeline: blocks ``transformer_blocks``, ForwardPattern.Pattern_3, DiTPatchFunctor), batched CFG.
    ``make(value, ctx)`` gives ``(cache_config, calibrator_config)``."""

    def build(ctx: Context, value) -> Built:
        import cache_dit
        from cache_dit.caching.block_adapters.adapters import dit_adapter

        from ditfx.models import digits

        pipe = digits.pipeline()
        cache_config, calibrator = make(value, ctx)
        cache_dit.enable_cache(dit_adapter(pipe, has_separate_cfg=False), cache_config=cache_config,
                               calibrator_config=calibrator)

        def extras() -> dict:
            stats = cache_dit.summary(pipe, logging=False)
            cached = [len(s.cached_steps or []) for s in stats if getattr(s, "cached_steps", None) is not None]
            return {"cached_steps": max(cached) if cached else None}

        return Built(pipe, extras=extras, close=lambda: cache_dit.disable_cache(pipe))

    return Method(name=f"cache-dit {name}", family="cache-dit", knob=knob, values=values, build=build,
                  requires="cache_dit", notes=notes)


def cache_dit_methods() -> list[Method]:
    def dbcache(**kw):
        def make(value, ctx):
            from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

            config = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "enable_separate_cfg": False,
                      "num_inference_steps": ctx.steps}
            taylor = kw.get("taylorseer", False)
            if kw.get("mask"):
                from cache_dit import steps_mask

                config.update(steps_computation_mask=steps_mask(total_steps=ctx.steps, mask_policy=value),
                              steps_computation_policy="static")
            else:
                config.update(residual_diff_threshold=value)
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None
            return DBCacheConfig(**config), calibrator
        return make

    return [
        cache_dit_method("DBCache F1B0", "residual_diff_threshold", [0.05, 0.08, 0.1, 0.12, 0.15],
                         dbcache(), notes="Fn=1, Bn=0 (FBCache); max_warmup_steps 8 (the default)."),
        cache_dit_method("DBCache F1B0 + TaylorSeer", "residual_diff_threshold", [0.08, 0.12, 0.16, 0.2, 0.3],
                         dbcache(taylorseer=True), notes="TaylorSeer calibrator of order 1 on the cached residual."),
        cache_dit_method("DBCache F1B0 + SCM static + TaylorSeer", "mask_policy", ["slow", "medium", "fast", "ultra"],
                         dbcache(taylorseer=True, mask=True),
                         notes="steps_mask(mask_policy) with steps_computation_policy='static' (cache-dit's "
                               "'DBCache + SCM + TaylorSeer' recipe)."),
    ]


def compile_cache_dit(pipe, ctx: Context) -> None:
    """cache-dit's documented compile recipe: its global compile settings, then torch.compile."""
    import cache_dit

    cache_dit.set_compile_configs()
    compile_transformer(pipe, ctx)


# ---- ditfx ---------------------------------------------------------------------------------------------------

def ditfx_method(name: str, knob: str, values: list, make_config: Callable[[Any, Context], Any],
                 prepare: Callable[[Context], dict] | None = None, prepared_as: str | None = None,
                 notes: str = "") -> Method:
    """A ditfx configuration: ``make_config(value, ctx)`` gives the ``ditfx.Config`` for ``ditfx.optimize``
    (which compiles the pipeline's transformer in place). Add a new ditfx technique as one more of these."""

    def build(ctx: Context, value) -> Built:
        import ditfx
        from ditfx.models import digits

        pipe = ditfx.optimize(digits.pipeline(), make_config(value, ctx))

        def extras() -> dict:
            s = ditfx.stats(pipe.transformer)
            total = s.block_evals + s.block_evals_skipped
            out = {"block_evals": s.block_evals, "block_evals_skipped": s.block_evals_skipped,
                   "block_evals_frac": round(s.block_evals / total, 4) if total else None,
                   "recompiles": s.recompiles, "graph_breaks": s.graph_breaks}
            if getattr(s, "nfe", None):
                out["nfe"] = s.nfe
            return out

        return Built(pipe, extras=extras, before_timed_run=lambda: ditfx.reset_stats(pipe.transformer))

    return Method(name=f"ditfx {name}", family="ditfx", knob=knob, values=values, build=build, compiled=True,
                  prepare=prepare, prepared_as=prepared_as, notes=notes)


def prepare_ditfx_schedule(ctx: Context) -> dict:
    """``ditfx.calibrate`` on the pipeline: one uncached generation (calibration seed) records each block's
    change curve."""
    import ditfx
    from ditfx.models import digits

    def run(model):
        pipe = digits.DigitsPipeline(transformer=model, scheduler=digits.make_scheduler())
        ctx.generate(pipe, seed=CALIBRATION_SEED)

    start = time.perf_counter()
    schedule = ditfx.calibrate(digits.load_transformer(), run, generations=1)
    return {"schedule": dataclasses.asdict(schedule), "prepare_s": time.perf_counter() - start}


SCHEDULE = "ditfx block-cache schedule"
AG_GAMMA = 0.995  # the demo's gamma


def ditfx_methods() -> list[Method]:
    import ditfx

    def config(cache, ctx: Context, guidance=None, budget=None):
        # Every region compiled, like transformer.compile() of the whole model that the peers get; the
        # default, compile_regions="blocks", leaves the prologue and epilogue uncompiled for a faster first call.
        return ditfx.Config(cache=cache, guidance=guidance, compiler=ctx.compiler, compile_regions="all",
                            budget=budget)

    def budget(flops):
        from ditfx.models.digits import budget_adapter

        return ditfx.TokenBudget(adapter=budget_adapter(), flops=flops)

    def schedule(ctx: Context) -> ditfx.CacheSchedule:
        return ditfx.CacheSchedule(**ctx.prepared[SCHEDULE]["schedule"])

    def together(delta, ctx: Context) -> ditfx.StaticCache:
        return ditfx.StaticCache(delta, schedule(ctx), per_block=False, forecast="linear")

    together_deltas = [0.3, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2]

    return [
        ditfx_method("DynamicCache", "threshold", [0.05, 0.08, 0.1, 0.12, 0.15, 0.2],
                     lambda v, ctx: config(ditfx.DynamicCache(threshold=v), ctx),
                     notes="first=1, last=0, warmup=1, per-sample decisions (the defaults): a step skips the "
                           "blocks only where every sample of the batch is below the threshold."),
        ditfx_method("DynamicCache per_sample=False", "threshold", [0.05, 0.08, 0.1, 0.12, 0.13, 0.14, 0.15, 0.2],
                     lambda v, ctx: config(ditfx.DynamicCache(threshold=v, per_sample=False), ctx),
                     notes="one decision per batch from the summed change, as the peers decide."),
        ditfx_method("StaticCache", "delta", [0.15, 0.2, 0.25, 0.3, 0.32, 0.35, 0.4],
                     lambda v, ctx: config(ditfx.StaticCache(v, schedule(ctx), per_block=True, forecast="none"), ctx),
                     prepare=prepare_ditfx_schedule, prepared_as=SCHEDULE,
                     notes="the paper's per-block schedule, calibrated once on this pipeline (ditfx.calibrate, "
                           "1 generation, seed 1000)."),
        ditfx_method("StaticCache together+linear", "delta", together_deltas,
                     lambda v, ctx: config(together(v, ctx), ctx),
                     prepare=prepare_ditfx_schedule, prepared_as=SCHEDULE,
                     notes="the same schedule with per_block=False (the blocks recompute together, when their mean "
                           "accumulated change exceeds delta) and forecast='linear'."),
        ditfx_method("StaticCache together+linear + AdaptiveGuidance", "delta", together_deltas,
                     lambda v, ctx: config(together(v, ctx), ctx, ditfx.AdaptiveGuidance(AG_GAMMA, fill="cond")),
                     prepare=prepare_ditfx_schedule, prepared_as=SCHEDULE,
                     notes=f"the cache above with Adaptive Guidance (gamma {AG_GAMMA}, per sample, the paper's "
                           "fill='cond'): each sample's guidance ends once its two predictions agree."),
        ditfx_method("StaticCache together+linear + AdaptiveGuidance fill=delta", "delta", together_deltas,
                     lambda v, ctx: config(together(v, ctx), ctx, ditfx.AdaptiveGuidance(fill="delta")),
                     prepare=prepare_ditfx_schedule, prepared_as=SCHEDULE,
                     notes="the cache above with Adaptive Guidance at its default gamma (0.99), fill='delta': a "
                           "switched sample keeps its last guidance direction, fading to zero at t = 0."),
        ditfx_method("TokenBudget", "flops", [0.8, 0.7, 0.6, 0.5, 0.45],
                     lambda v, ctx: config(None, ctx, budget=budget(v)),
                     notes="FlexiDiT: the first steps at patch 4 (16 tokens instead of 64) with the shipped distilled "
                           "adapter (ditfx.models.digits.budget_adapter()), as few as bring the FLOPs to the knob's "
                           "fraction of native."),
        ditfx_method("TokenBudget 0.7 + StaticCache together+linear + AdaptiveGuidance fill=delta", "delta",
                     together_deltas,
                     lambda v, ctx: config(together(v, ctx), ctx, ditfx.AdaptiveGuidance(fill="delta"), budget(0.7)),
                     prepare=prepare_ditfx_schedule, prepared_as=SCHEDULE,
                     notes="the token budget at 0.7 of the native FLOPs with the cache and guidance skipping above: "
                           "the cache keeps one state per patch size, guidance state carries across."),
    ]


# ---- the table of methods ------------------------------------------------------------------------------------

def all_methods() -> list[Method]:
    """Every benchmarked method, in run order (an eager peer runs before its compiled variant, whose sweep it
    may narrow)."""
    methods = [
        Method("eager", "baseline", "-", [None], build_eager, notes="the baseline: diffusers' DiT, no cache"),
        Method("torch.compile", "torch", "-", [None], build_torch_compile, compiled=True,
               notes="transformer.compile() (Inductor, default mode)"),
        *ditfx_methods(),
    ]
    try:
        peers = diffusers_methods()
    except ImportError as e:  # an older diffusers without some config: report, keep the rest
        peers = [Method("diffusers cache hooks", "diffusers", "-", [None], build_eager, notes=f"import: {e}")]
    for m in peers:
        methods += [m, compiled_variant(m, compile_transformer,
                                        "transformer.compile() after enable_cache (graph breaks at the hooks)")]
    for m in cache_dit_methods():
        methods += [m, compiled_variant(m, compile_cache_dit,
                                        "cache_dit.set_compile_configs() then transformer.compile()")]
    return methods


def select(methods: list[Method], patterns: Sequence[str] | None) -> list[Method]:
    if not patterns:
        return methods
    return [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]


# --------------------------------------------------------------------------------------------------------------
# Worker: one method, in its own process
# --------------------------------------------------------------------------------------------------------------

def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(method: Method, value, ctx: Context, baseline: dict, budget: Budget) -> dict:
    """One setting: build, warm up (compiled), one timed generation, quality against the baseline."""
    import torch

    from ditfx.models import digits

    torch._dynamo.reset()
    point: dict[str, Any] = {"knob": value}
    built = method.build(ctx, value)
    try:
        if method.compiled:
            _, warm_wall, _ = ctx.generate(built.pipe)
            point["warmup_s"] = round(warm_wall, 3)
        if built.before_timed_run:
            built.before_timed_run()
        graphs = _dynamo_graphs()
        images, wall, cpu = ctx.generate(built.pipe)
        if method.compiled:
            point["compile_s"] = round(point["warmup_s"] - wall, 3)
            point["graphs_compiled_in_timed_run"] = _dynamo_graphs() - graphs
        point.update(wall_s=round(wall, 3), cpu_s=round(cpu, 3),
                     speedup=round(baseline["wall_s"] / wall, 4), cpu_speedup=round(baseline["cpu_s"] / cpu, 4))
        quality = digits.metrics(images, ctx.labels, reference=baseline["images"])
        point.update({k: (None if v is None else float(v)) for k, v in quality.items()})
        point["fd_gap"] = round(budget.fd_gap(point["fd"], baseline["fd"]), 4)
        if built.extras:
            with contextlib.suppress(Exception):
                point.update(built.extras())
    finally:
        if built.close:
            with contextlib.suppress(Exception):
                built.close()
    point["in_budget"] = budget.admits(point, baseline["fd"])
    point["error"] = None
    return point


def run_worker(args) -> int:
    """Run one method's sweep and write its JSON (``--worker NAME``); points stream to stdout as they finish."""
    import torch

    workdir = Path(args.workdir)
    torch.set_num_threads(args.threads)
    baseline = torch.load(workdir / "baseline.pt", weights_only=True)
    budget = Budget(args.min_psnr, args.fd_tolerance, args.fd_side)
    ctx = make_context(args)
    methods = {m.name: m for m in all_methods()}
    method = methods[args.worker]
    values = json.loads(args.values) if args.values else method.values
    result: dict[str, Any] = {"name": method.name, "family": method.family, "knob": method.knob,
                              "compiled": method.compiled, "notes": method.notes, "points": [], "error": None}
    out_path = workdir / f"{safe_name(method.name)}{args.suffix}.json"

    def save():
        out_path.write_text(json.dumps(result, indent=1, default=str))

    try:
        if method.requires:
            __import__(method.requires)
        warm_up(ctx)
        if method.prepare:
            prepared = prepare_once(method, ctx, workdir)
            result["prepare_s"] = round(prepared.get("prepare_s", 0.0), 3)
            if "mag_ratios" in prepared:
                result["mag_ratios"] = [round(r, 5) for r in prepared["mag_ratios"]]
    except Exception as e:  # noqa: BLE001 -- the method cannot run at all on this model: report it
        result["error"] = _error_text(e)
        save()
        print(POINT_TAG + json.dumps({"method": method.name, "error": result["error"], "skip": len(values)}),
              flush=True)
        return 0
    for value in values:
        try:
            point = measure(method, value, ctx, baseline, budget)
        except Exception as e:  # noqa: BLE001 -- any failure of a peer is a result
            point = {"knob": value, "error": _error_text(e), "in_budget": False}
        result["points"].append(point)
        errors = [p["error"] for p in result["points"] if p.get("error")]
        result["error"] = errors[0] if len(errors) == len(result["points"]) else None
        save()
        print(POINT_TAG + json.dumps({"method": method.name, "point": point}, default=str), flush=True)
    return 0


def prepare_once(method: Method, ctx: Context, workdir: Path) -> dict:
    """The method's one-time preparation (JSON values), shared with its compiled variant and the methods naming
    the same ``prepared_as`` through ``workdir``."""
    key = method.prepared_as or method.follows or method.name
    path = workdir / f"{safe_name(key)}.prepared.json"
    if path.is_file():
        prepared = {**json.loads(path.read_text()), "prepare_s": 0.0, "reused_from": key}
    else:
        prepared = method.prepare(ctx)
        path.write_text(json.dumps(prepared))
    ctx.prepared[key] = ctx.prepared[method.name] = prepared
    return prepared


def warm_up(ctx: Context) -> None:
    """Allocator and thread-pool warm-up for this process: a two-step eager generation of the same batch."""
    from ditfx.models import digits

    steps, ctx.steps = ctx.steps, 2
    try:
        ctx.generate(digits.pipeline())
    finally:
        ctx.steps = steps


def make_context(args) -> Context:
    import torch

    from ditfx.models.digits.data import NUM_CLASSES

    ctx = Context(per_class=args.per_class, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                  compiler=args.compiler)
    ctx.labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    return ctx


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    import diffusers
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "cuda": torch.cuda.is_available()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    try:
        import cache_dit

        info["cache_dit"] = cache_dit.__version__
    except Exception as e:  # noqa: BLE001 -- optional dependency
        info["cache_dit"] = f"not installed ({type(e).__name__})"
    import ditfx

    info["ditfx"] = ditfx.__version__
    info["ditfx_path"] = str(Path(ditfx.__file__).parent)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(Path(__file__).resolve().parent)]
        info["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                            check=True).stdout.strip()
        info["git_modified"] = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                              capture_output=True, text=True, check=True).stdout.split("\n")
        info["git_modified"] = [line.strip() for line in info["git_modified"] if line.strip()]
    return info


def run_baseline(args, workdir: Path) -> dict:
    """The eager uncached pipeline, same seed: reference images, wall time, FD and accuracy."""
    import torch

    from ditfx.models import digits

    torch.set_num_threads(args.threads)
    ctx = make_context(args)
    warm_up(ctx)
    images, wall, cpu = ctx.generate(digits.pipeline())
    quality = digits.metrics(images, ctx.labels)
    baseline = {"images": images, "wall_s": wall, "cpu_s": cpu, "fd": float(quality["fd"]),
                "accuracy": float(quality["accuracy"]), "settings": settings_key(args)}
    torch.save(baseline, workdir / "baseline.pt")
    return baseline


def settings_key(args) -> dict:
    return {"per_class": args.per_class, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "seed": args.seed, "threads": args.threads, "compiler": args.compiler}


def run_method_subprocess(args, method: Method, values: list, workdir: Path, bar, suffix: str = "") -> dict:
    """Run one method in a fresh interpreter; returns its result (an error entry if the process died)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method.name, "--workdir", str(workdir),
           "--values", json.dumps(values), "--suffix", suffix, *forwarded_args(args)]
    log_path = workdir / f"{safe_name(method.name)}{suffix}.log"
    out_path = workdir / f"{safe_name(method.name)}{suffix}.json"
    out_path.unlink(missing_ok=True)
    done = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        for line in proc.stdout:
            if line.startswith(POINT_TAG):
                msg = json.loads(line[len(POINT_TAG):])
                n = msg.get("skip", 1)
                done += n
                bar.update(n)
                p = msg.get("point") or {}
                bar.set_postfix_str(f"{method.name[:40]} {knob_label(p.get('knob'))} "
                                    f"x{p.get('speedup', 0):.2f}" if p.get("speedup") else method.name[:40])
            else:
                log.write(line)
        code = proc.wait()
    if len(values) > done:
        bar.update(len(values) - done)
    if out_path.is_file():
        result = json.loads(out_path.read_text())
        if code != 0 and not result.get("error") and len(result["points"]) < len(values):
            result["error"] = f"worker exited with code {code} after {len(result['points'])} settings: " \
                              f"{_log_tail(log_path)}"
        return result
    return {"name": method.name, "family": method.family, "knob": method.knob, "compiled": method.compiled,
            "notes": method.notes, "points": [],
            "error": f"worker exited with code {code}: {_log_tail(log_path)}"}


def _log_tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])


def forwarded_args(args) -> list[str]:
    return ["--per-class", str(args.per_class), "--steps", str(args.steps), "--guidance-scale",
            str(args.guidance_scale), "--seed", str(args.seed), "--threads", str(args.threads),
            "--compiler", args.compiler, "--min-psnr", str(args.min_psnr), "--fd-tolerance",
            str(args.fd_tolerance), "--fd-side", args.fd_side]


def load_baseline_summary(workdir: Path) -> dict:
    import torch

    b = torch.load(workdir / "baseline.pt", weights_only=True)
    return {k: v for k, v in b.items() if k != "images"}


def run_driver(args) -> dict:
    from tqdm import tqdm

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.min_psnr, args.fd_tolerance, args.fd_side)
    methods = select(all_methods(), args.methods)
    load_before = os.getloadavg()
    machine = machine_info(args.threads)
    started = time.time()

    resumed: dict[str, dict] = {}
    baseline_file = workdir / "baseline.pt"
    if args.resume and baseline_file.is_file() and load_baseline_summary(workdir)["settings"] == settings_key(args):
        baseline = load_baseline_summary(workdir)
        for m in methods:
            path = workdir / f"{safe_name(m.name)}.json"
            if path.is_file():
                resumed[m.name] = json.loads(path.read_text())
        print(f"resuming from {workdir}: baseline and {len(resumed)} methods reused", file=sys.stderr)
    else:
        print("baseline: eager pipeline ...", file=sys.stderr)
        baseline = {k: v for k, v in run_baseline(args, workdir).items() if k != "images"}
    print(f"baseline: {baseline['wall_s']:.1f} s wall, FD {baseline['fd']:.1f}, accuracy {baseline['accuracy']:.3f}",
          file=sys.stderr)

    results: dict[str, dict] = {}
    planned = {m.name: (list(m.values)[:2] if args.quick else list(m.values)) for m in methods}
    total = sum(len(missing_values(planned[m.name], resumed.get(m.name))) for m in methods)
    with tqdm(total=total, desc="settings", file=sys.stderr, dynamic_ncols=True) as bar:
        for m in methods:
            values = planned[m.name]
            if m.name == "eager":
                results[m.name] = resumed.get(m.name) or eager_result(m, baseline)
                (workdir / "eager.json").write_text(json.dumps(results[m.name], indent=1))
                continue
            if m.follows and args.compiled_sweep == "near-budget" and m.follows in results \
                    and not results[m.follows].get("error"):
                values = near_budget_values(values, aligned_points(planned[m.follows], results[m.follows]))
            have = resumed.get(m.name)
            todo = missing_values(values, have)
            bar.total += len(todo) - len(missing_values(planned[m.name], have))
            bar.refresh()
            if not todo:
                results[m.name] = have
                continue
            new = run_method_subprocess(args, m, todo, workdir, bar, suffix=".more" if have else "")
            results[m.name] = merge_results(have, new, m.values) if have else new
            (workdir / f"{safe_name(m.name)}.json").write_text(json.dumps(results[m.name], indent=1))

    if args.recheck_baseline:
        print("re-timing the eager baseline ...", file=sys.stderr)
        recheck = recheck_baseline(args, workdir)
        (workdir / "recheck.json").write_text(json.dumps(recheck))
    elif (workdir / "recheck.json").is_file():
        recheck = json.loads((workdir / "recheck.json").read_text())
    else:
        recheck = {}
    if recheck:
        baseline["wall_s_recheck"] = recheck.get("wall_s")
        baseline["cpu_s_recheck"] = recheck.get("cpu_s")

    confirmation = run_confirmation(args, workdir, results, baseline, budget) if args.confirm else None
    report = json_safe(assemble(args, machine, baseline, results, budget, load_before, started))
    if confirmation:
        report["confirmation"] = json_safe(confirmation)
        report["summary"]["confirmed"] = compare_confirmed(report["methods"], confirmation)
    print("\n" + format_table(report), file=sys.stderr)
    if confirmation:
        for name, c in confirmation["methods"].items():
            print(f"confirmed  {name:<60} x{_fmt(c['speedup_median'], '.2f')} wall, "
                  f"x{_fmt(c['cpu_speedup_median'], '.2f')} CPU over {c['runs']} rounds", file=sys.stderr)
    if args.verbose:
        for name, m in report["methods"].items():
            if m["points"]:
                print(format_points(name, m["points"]), file=sys.stderr)
    return report


def confirmation_candidates(summary: dict, k: int) -> list[tuple[str, Any]]:
    """(method, best in-budget knob) to re-time: of ditfx's methods and of the peers, each the ``k`` best by
    wall-time speed-up and the ``k`` best by CPU-time speed-up."""
    methods = summary["methods"]

    def leaders(names: list[str]) -> list[str]:
        by_wall = sorted(names, key=lambda n: -methods[n]["best_speedup_in_budget"])[:k]
        by_cpu = sorted((n for n in names if methods[n]["best_cpu_speedup_in_budget"] is not None),
                        key=lambda n: -methods[n]["best_cpu_speedup_in_budget"])[:k]
        return list(dict.fromkeys(by_wall + by_cpu))

    ditfx = [n for n, m in methods.items() if m["family"] == "ditfx" and m["best_point"]]
    peers = [n for n, m in methods.items() if m["family"] not in ("ditfx", "baseline") and m["best_point"]]
    # the knob of the wall-time best (the CPU-time best of a method is usually the same setting)
    return [(n, methods[n]["best_setting"]) for n in leaders(ditfx) + leaders(peers)]


def run_confirmation(args, workdir: Path, results: dict[str, dict], baseline: dict, budget: Budget) -> dict:
    """Re-time the leading settings in interleaved rounds. Each round times the eager baseline and then every
    candidate (in a rotated order), each in a fresh process with its own warm-up, so every speed-up is against
    an eager run made minutes before it; the medians over rounds are what other jobs on the machine disturb
    least."""
    from statistics import median

    from tqdm import tqdm

    path = workdir / "confirm.json"
    candidates = confirmation_candidates(summaries(baseline, results, budget), args.confirm)
    if args.resume and path.is_file():
        done = json.loads(path.read_text())
        if [tuple(c) for c in done.get("candidates", [])] == [(n, json.dumps(k)) for n, k in candidates] \
                and len(done.get("rounds", [])) >= args.rounds:
            return done
    methods = {m.name: m for m in all_methods()}
    rounds = []
    total = args.rounds * (len(candidates) + 1)
    with tqdm(total=total, desc="confirmation", file=sys.stderr, dynamic_ncols=True) as bar:
        for r in range(args.rounds):
            eager = recheck_baseline(args, workdir)
            bar.update(1)
            entry = {"eager_wall_s": eager.get("wall_s"), "eager_cpu_s": eager.get("cpu_s"), "methods": {}}
            shift = r % max(1, len(candidates))
            for name, knob in candidates[shift:] + candidates[:shift]:
                res = run_method_subprocess(args, methods[name], [knob], workdir, bar, suffix=f".confirm{r}")
                point = (res.get("points") or [{}])[0]
                if point.get("error") or not point.get("wall_s") or not eager.get("wall_s"):
                    entry["methods"][name] = {"error": point.get("error") or res.get("error")}
                    continue
                entry["methods"][name] = {
                    "wall_s": point["wall_s"], "cpu_s": point["cpu_s"],
                    "speedup": round(eager["wall_s"] / point["wall_s"], 4),
                    "cpu_speedup": round(eager["cpu_s"] / point["cpu_s"], 4),
                    "psnr": point.get("psnr"), "fd": point.get("fd")}
            rounds.append(entry)
    per_method = {}
    for name, knob in candidates:
        runs = [rd["methods"].get(name, {}) for rd in rounds]
        ok = [x for x in runs if "speedup" in x]
        per_method[name] = {
            "knob": knob, "family": methods[name].family, "runs": len(ok),
            "speedup_median": round(median(x["speedup"] for x in ok), 4) if ok else None,
            "cpu_speedup_median": round(median(x["cpu_speedup"] for x in ok), 4) if ok else None,
            "speedups": [x["speedup"] for x in ok], "cpu_speedups": [x["cpu_speedup"] for x in ok],
            "errors": [x["error"] for x in runs if x.get("error")]}
    out = {"rule": "median over rounds of (eager wall of the round / method wall), each method at its best "
                   "in-budget setting of the sweep; same for CPU time",
           "rounds_requested": args.rounds, "candidates": [(n, json.dumps(k)) for n, k in candidates],
           "rounds": rounds, "methods": per_method}
    path.write_text(json.dumps(out, indent=1))
    return out


def compare_confirmed(methods: dict, confirmation: dict) -> dict:
    """The ditfx-against-peers comparison on the confirmed medians."""
    table = {n: {"family": c["family"], "speedup": c["speedup_median"], "cpu": c["cpu_speedup_median"]}
             for n, c in confirmation["methods"].items()}
    return {"wall": compare(table, "speedup"), "cpu": compare(table, "cpu")}


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def missing_values(values: list, have: dict | None) -> list:
    """The knob values of ``values`` that ``have`` (a method's saved result) has no point for."""
    done = {_key(p.get("knob")) for p in (have or {}).get("points", [])}
    return [v for v in values if _key(v) not in done]


def aligned_points(values: list, result: dict) -> list[dict]:
    """The result's points in the order of ``values`` ({} where a value has none)."""
    by_key = {_key(p.get("knob")): p for p in result.get("points", [])}
    return [by_key.get(_key(v), {}) for v in values]


def merge_results(have: dict, new: dict, order: list) -> dict:
    """A resumed method's saved points plus the newly measured ones, in sweep order."""
    rank = {_key(v): i for i, v in enumerate(order)}
    points = sorted(have.get("points", []) + new.get("points", []),
                    key=lambda p: rank.get(_key(p.get("knob")), len(rank)))
    errors = [p["error"] for p in points if p.get("error")]
    merged = {**have, "points": points,
              "error": (errors[0] if points and len(errors) == len(points) else None) or
                       (new.get("error") if not points else None)}
    return merged


def eager_result(m: Method, baseline: dict) -> dict:
    """The eager method's one point: the baseline itself."""
    return {"name": m.name, "family": m.family, "knob": m.knob, "compiled": False, "notes": m.notes,
            "error": None,
            "points": [{"knob": None, "wall_s": round(baseline["wall_s"], 3), "cpu_s": round(baseline["cpu_s"], 3),
                        "speedup": 1.0, "cpu_speedup": 1.0, "fd": baseline["fd"], "accuracy": baseline["accuracy"],
                        "psnr": math.inf, "ssim": 1.0, "fd_gap": 0.0, "in_budget": True, "error": None}]}


def recheck_baseline(args, workdir: Path) -> dict:
    """The eager baseline timed once more at the end (same process kind: a fresh interpreter), to show drift."""
    cmd = [sys.executable, os.path.abspath(__file__), "--recheck-worker", "--workdir", str(workdir),
           *forwarded_args(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith(POINT_TAG):
            return json.loads(line[len(POINT_TAG):])
    return {"wall_s": None, "cpu_s": None, "error": out.stderr[-500:]}


def run_recheck_worker(args) -> int:
    import torch

    from ditfx.models import digits

    torch.set_num_threads(args.threads)
    ctx = make_context(args)
    warm_up(ctx)
    _, wall, cpu = ctx.generate(digits.pipeline())
    print(POINT_TAG + json.dumps({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}), flush=True)
    return 0


def json_safe(obj):
    """Infinite values (PSNR of an image against itself) become None: the report is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summaries(baseline: dict, results: dict[str, dict], budget: Budget) -> dict:
    """The report's derived parts from the raw per-method results: methods (with their summaries), the overall
    Pareto front and the ditfx-against-peers comparison."""
    methods_out: dict[str, dict] = {}
    everything = []
    for name, r in results.items():
        points = r.get("points", [])
        for p in points:
            if not p.get("error") and p.get("fd") is not None:
                if p.get("psnr") is None:  # identical to the baseline (inf, stored as null)
                    p["psnr"] = math.inf
                p["fd_gap"] = round(budget.fd_gap(p["fd"], baseline["fd"]), 4)
                p["in_budget"] = budget.admits(p, baseline["fd"])
                everything.append({**p, "method": name})
        entry = {"family": r.get("family"), "knob_name": r.get("knob", r.get("knob_name")),
                 "compiled": r.get("compiled"), "notes": r.get("notes"),
                 **summarize(points, budget, baseline["fd"]), "points": points, "error": r.get("error")}
        for extra in ("prepare_s", "mag_ratios"):
            if extra in r:
                entry[extra] = r[extra]
        methods_out[name] = entry
    front = pareto_front(everything)
    other = Budget(budget.min_psnr, budget.fd_tolerance, "upper" if budget.fd_side == "both" else "both")
    alternative = {name: {k: v for k, v in summarize(r.get("points", []), other, baseline["fd"]).items()
                          if k in ("best_speedup_in_budget", "best_setting", "best_cpu_speedup_in_budget",
                                   "best_cpu_setting")} | {"family": r.get("family")}
                   for name, r in results.items()}
    return {
        "alternative_budget": {"budget": other.to_dict(), "methods": alternative,
                               "summary": {"wall": compare(alternative),
                                           "cpu": compare(alternative, "best_cpu_speedup_in_budget")}},
        "methods": methods_out,
        "pareto": [{k: p.get(k) for k in ("method", "knob", "speedup", "cpu_speedup", "psnr", "fd", "fd_gap",
                                          "ssim", "accuracy")} for p in front],
        "summary": {"wall": compare(methods_out), "cpu": compare(methods_out, "best_cpu_speedup_in_budget")},
    }


def assemble(args, machine: dict, baseline: dict, results: dict[str, dict], budget: Budget, load_before,
             started) -> dict:
    return {
        "benchmark": "peers",
        "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
        "machine": {**machine, "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"model": "digits DiT (ditfx.models.digits), DiTTransformer2DModel, 6 blocks, 64 tokens",
                     "samples": args.per_class * 10, "per_class": args.per_class, "steps": args.steps,
                     "scheduler": "FlowMatchEulerDiscreteScheduler", "guidance_scale": args.guidance_scale,
                     "batch": args.per_class * 10 * (2 if args.guidance_scale > 1 else 1), "seed": args.seed,
                     "calibration_seed": CALIBRATION_SEED, "compiler": args.compiler,
                     "compiled_sweep": args.compiled_sweep, "quick": args.quick,
                     "timing": "one generation after warm-up; compiled settings warm up with one full generation "
                               "(warmup_s); compile_s = warmup_s - wall_s; cpu_s: CPU time of the process",
                     "elapsed_s": round(time.time() - started, 1)},
        "budget": budget.to_dict(),
        "baseline": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in baseline.items()},
        **summaries(baseline, results, budget),
    }


def from_report(path: str, budget: Budget) -> dict:
    """Recompute the derived parts of a written report (summaries, fronts, comparison) from its points."""
    report = json.loads(Path(path).read_text())
    raw = {name: {**m, "knob": m.get("knob_name")} for name, m in report["methods"].items()}
    report.update(budget=budget.to_dict(), **summaries(report["baseline"], raw, budget))
    report.pop("pareto_cpu", None)
    return json_safe(report)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", nargs="?", const="-", help="write the report to this path ('-': stdout)")
    p.add_argument("--per-class", type=int, default=10, help="samples per digit (N = 10 x this)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadier timings on a CPU shared with other jobs)")
    p.add_argument("--compiler", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="backend of every torch.compile and of ditfx's regions "
                        "(default inductor; aot_eager in --quick)")
    p.add_argument("--methods", nargs="*", help="run only these methods (shell patterns on the names)")
    p.add_argument("--compiled-sweep", choices=["near-budget", "all"], default="near-budget",
                   help="compiled peers repeat the eager twin's in-budget knobs plus the next one, or all knobs")
    p.add_argument("--min-psnr", type=float, default=30.0)
    p.add_argument("--fd-tolerance", type=float, default=0.10)
    p.add_argument("--fd-side", choices=["both", "upper"], default="both",
                   help="digits-FD within the tolerance on both sides of the baseline's (default), or only above")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 per class, 8 steps, 2 knobs per method")
    p.add_argument("--workdir", default="out/peers_work", help="baseline, per-method JSON and logs")
    p.add_argument("--resume", action="store_true", help="reuse the baseline and finished methods in --workdir")
    p.add_argument("--recheck-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="time the eager baseline again at the end (default: on, off in --quick)")
    p.add_argument("--verbose", action="store_true", help="print every point")
    p.add_argument("--list", action="store_true", help="list the methods and their sweeps")
    p.add_argument("--from-report", metavar="JSON",
                   help="run nothing: recompute the summaries of a written report (e.g. for another budget)")
    p.add_argument("--markdown", action="store_true", help="print the report's tables as Markdown to stdout")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--values", help=argparse.SUPPRESS)
    p.add_argument("--suffix", default="", help=argparse.SUPPRESS)
    p.add_argument("--confirm", type=int, default=None, metavar="K",
                   help="after the sweep, re-time the best in-budget setting of the K best ditfx methods and of the K "
                        "best peers (by wall and by CPU time) in --rounds interleaved rounds, each against an eager "
                        "run "
                        "of its own round (default 4; 0: none; off in --quick)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recheck-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker and not args.recheck_worker:
        if "--per-class" not in (argv if argv is not None else sys.argv):
            args.per_class = 1
        if "--steps" not in (argv if argv is not None else sys.argv):
            args.steps = 8
    if args.compiler is None:
        args.compiler = "aot_eager" if args.quick else "inductor"
    if args.recheck_baseline is None:
        args.recheck_baseline = not args.quick
    if args.confirm is None:
        args.confirm = 0 if args.quick else 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.recheck_worker:
        return run_recheck_worker(args)
    if args.list:
        for m in all_methods():
            print(f"{m.name:<55} {m.knob}: {', '.join(knob_label(v) for v in m.values)}")
        return 0
    if args.from_report:
        report = from_report(args.from_report, Budget(args.min_psnr, args.fd_tolerance, args.fd_side))
        print(format_table(report), file=sys.stderr)
    else:
        report = run_driver(args)
    if args.markdown:
        print(format_markdown(report))
    if args.json:
        text = json.dumps(report, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
