"""Public API: optimize(), generation(), stats(), calibrate()."""
from __future__ import annotations

import contextlib
import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ditfx import validation
from ditfx.config import CacheCalibration, Config, GuidanceRecording
from ditfx.runtime import diffusers_hook, linear_ag
from ditfx.runtime.block_cache import CalibrationPolicy
from ditfx.runtime.guidance import RECORDING, TRACE
from ditfx.runtime.schedule import CacheSchedule, block_fingerprint
from ditfx.runtime.session import Stats
from ditfx.runtime.state import ModelRuntime

_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _denoiser(obj) -> tuple[nn.Module, bool]:
    """The denoiser inside a diffusers pipeline (``transformer``), or the module itself."""
    if isinstance(obj, nn.Module):
        return obj, False
    module = getattr(obj, "transformer", None)
    if isinstance(module, nn.Module):
        return module, True
    raise TypeError(
        f"ditfx.optimize takes an nn.Module (a DiT denoiser) or a diffusers pipeline with a 'transformer', "
        f"got {type(obj).__name__}"
    )


def repeated_blocks(module: nn.Module) -> list[str]:
    """Module paths of the repeated blocks, outermost first: the classes the model declares in
    ``_repeated_blocks`` (diffusers' convention), else ``<container>.<i>`` siblings of one non-leaf class."""
    declared = set(getattr(module, "_repeated_blocks", ()) or ())
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, m in module.named_modules():
        match = re.match(r"^(.*)\.(\d+)$", name)
        cls = type(m).__name__
        if match and (cls in declared if declared else any(True for _ in m.children())):
            members[(match.group(1), cls)].append(name)
    groups = [paths for paths in members.values() if len(paths) >= 2]
    blocks = [p for paths in groups for p in paths]
    return [p for p in blocks if not any(p.startswith(q + ".") for q in blocks)]


def null_class(module: nn.Module) -> int | None:
    """The class label of the unconditional branch of a class-conditional model: its label embedder's extra
    row (facebookresearch/DiT's and diffusers' ``LabelEmbedding``: ``num_classes`` rows plus the null one)."""
    for m in module.modules():
        table, n = getattr(m, "embedding_table", None), getattr(m, "num_classes", None)
        if isinstance(table, nn.Embedding) and isinstance(n, int) and table.num_embeddings == n + 1:
            return n
    return None


def optimize(model_or_pipeline, config: Config | None = None):
    """Compile a DiT denoiser (or a pipeline's ``transformer``) with ditfx.

    Returns an object with the same call signature: for a module, a compiled module; for a pipeline, the
    same pipeline, its transformer compiled in place (``nn.Module.compile``). Configuration errors, including
    those that depend on the model, are raised here, before anything is compiled.

    A diffusers model gets one stateful hook in its hook registry, through which the pipeline states where
    generations end and which branch a call is (``cache_context``); a pipeline's scheduler counts the steps.
    """
    module, is_pipeline = _denoiser(model_or_pipeline)
    if isinstance(getattr(module, "ditfx_runtime", None), ModelRuntime):
        return _bind_loaded(model_or_pipeline, module, is_pipeline, config)
    config = config or Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a ditfx.Config, got {type(config).__name__}")
    # the compiler stack is imported here, not with ditfx: a loaded package never needs it
    from ditfx.backend import DitfxBackend
    from ditfx.passes.manager import ModelFacts

    validation.check_model(config, module)
    if config.compiler == "inductor" and all(p.device.type == "cpu" for p in module.parameters()):
        from ditfx.runtime.compiler import probe_cpu_in_background

        probe_cpu_in_background()
    runtime = ModelRuntime()
    facts = ModelFacts(null_class=null_class(module), blocks=tuple(repeated_blocks(module)))
    backend = DitfxBackend(config, runtime, facts)
    hooked = diffusers_hook.install(module, runtime.lifecycle)
    if is_pipeline:
        runtime.lifecycle.pipeline_signals = hooked
        pipe = weakref.ref(model_or_pipeline)
        runtime.lifecycle.scheduler_of = lambda: getattr(pipe(), "scheduler", None)
        module.compile(backend=backend, dynamic=False)
        result = model_or_pipeline
        _RUNTIMES[module] = runtime
    else:
        result = torch.compile(module, backend=backend, dynamic=False)
    _RUNTIMES[result] = runtime
    return result


def _bind_loaded(obj, module: nn.Module, is_pipeline: bool, config: Config | None):
    """A package from :func:`ditfx.load` is compiled already: a pipeline around it states its generations and its
    scheduler counts the steps, as for an optimized pipeline."""
    if config is not None:
        raise ValueError("this transformer is a package loaded with ditfx.load: it runs the config it was exported "
                         f"with ({module.manifest['config']}); call ditfx.optimize(pipe) without a config, or export "
                         "the model again with the new one")
    if is_pipeline:
        lifecycle = module.ditfx_runtime.lifecycle
        lifecycle.pipeline_signals = True
        pipe = weakref.ref(obj)
        lifecycle.scheduler_of = lambda: getattr(pipe(), "scheduler", None)
    return obj


def _runtime(obj) -> ModelRuntime:
    runtime = getattr(obj, "ditfx_runtime", None)  # a loaded package
    if runtime is None and not isinstance(obj, nn.Module):
        runtime = getattr(getattr(obj, "transformer", None), "ditfx_runtime", None)
    if isinstance(runtime, ModelRuntime):
        return runtime
    runtime = _RUNTIMES.get(obj) if _weakrefable(obj) else None
    if runtime is not None:
        return runtime
    from ditfx.backend import backend_runtimes

    params = {id(p) for p in _parameters(obj)}
    for r in backend_runtimes():
        if params & r.parameters():
            return r
    raise ValueError(
        f"{type(obj).__name__} was not optimized by ditfx: pass what ditfx.optimize returned, or a module "
        "compiled with torch.compile(..., backend='ditfx') that has been called at least once"
    )


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def _parameters(obj):
    module = obj if isinstance(obj, nn.Module) else getattr(obj, "transformer", None)
    return list(module.parameters()) if isinstance(module, nn.Module) else []


def stats(optimized) -> Stats:
    """Counters of everything the optimized model ran (see :class:`~ditfx.runtime.session.Stats`)."""
    return _runtime(optimized).snapshot()


def reset_stats(optimized) -> None:
    runtime = _runtime(optimized)
    runtime.stats = Stats(graphs=runtime.stats.graphs, graphs_without_ditfx=runtime.stats.graphs_without_ditfx)


@contextlib.contextmanager
def generation(optimized) -> Iterator[None]:
    """Mark one generation explicitly (in this thread): state starts fresh on entry and is freed on exit."""
    lifecycle = _runtime(optimized).lifecycle
    lifecycle.enter_generation()
    try:
        yield
    finally:
        lifecycle.exit_generation()


def calibrate(model: nn.Module, run: Callable[[nn.Module], object], generations: int = 4,
              mode: str = "residual", compiler: str = "eager", progress: Callable[[int], None] | None = None
              ) -> CacheSchedule:
    """Record per-block change curves over ``generations`` uncached runs and return a cache schedule.

    ``run(optimized_model)`` must perform one full generation (a sampling loop) with the model it is given.
    """
    if generations < 1:
        raise ValueError(f"calibrate needs at least one generation, got {generations}")
    compiled = optimize(model, Config(cache=CacheCalibration(mode), compiler=compiler))
    runtime = _runtime(compiled)
    for g in range(generations):
        with generation(compiled):
            run(compiled)
        if progress is not None:
            progress(g + 1)
    runs = [r for r in runtime.records.get(CalibrationPolicy.RECORD, []) if r.rows]
    if not runs:
        raise RuntimeError("calibration recorded nothing: did run() call the model?")
    steps = len(runs[0].times)
    if any(len(s.times) != steps for s in runs):
        raise ValueError("every calibration generation must use the same number of steps (and branches)")
    structure = runtime.executors[0].plan.structure
    n = len(structure.blocks)
    change = [[sum(s.rows[k][i] for s in runs) / len(runs) for k in range(steps)] for i in range(n)]
    time_scale = max(abs(t) for s in runs for t in s.times) or 1.0
    times = [t / time_scale for t in runs[0].times]
    blocks = [b.path for b in structure.blocks]
    try:
        fingerprint = block_fingerprint(model, blocks)
    except ValueError:  # the graph's block paths are not the module's (a wrapper): paths only
        fingerprint = None
    return CacheSchedule(
        blocks=blocks, times=times, change=change, mode=mode, time_scale=time_scale, generations=generations,
        meta={"model": type(model).__name__, "branches": len(runs) // generations}, fingerprint=fingerprint,
    )


def calibrate_guidance(model: nn.Module, run: Callable[[nn.Module], object], generations: int = 4,
                       uncond_first: bool | None = None, compiler: str = "eager",
                       progress: Callable[[int], None] | None = None) -> linear_ag.LinearAGCoefficients:
    """Record full-guidance trajectories over ``generations`` runs and fit LinearAG's per-step coefficients.

    ``run(optimized_model)`` performs one generation with classifier-free guidance (batched or two calls per
    step); every generation must use the same step grid, which the coefficients are then valid for.
    """
    if generations < 1:
        raise ValueError(f"calibrate_guidance needs at least one generation, got {generations}")
    compiled = optimize(model, Config(guidance=GuidanceRecording(uncond_first), compiler=compiler))
    runtime = _runtime(compiled)
    for g in range(generations):
        with generation(compiled):
            run(compiled)
        if progress is not None:
            progress(g + 1)
    recorded = [s for s in runtime.records.get(RECORDING, []) if s.cond_history]
    if not recorded:
        raise RuntimeError("no classifier-free guidance was recorded: does run() sample with guidance > 1?")
    steps = len(recorded[0].cond_history)
    if any(len(s.cond_history) != steps for s in recorded):
        raise ValueError("every calibration generation must use the same number of steps")
    coefficients = linear_ag.fit([s.cond_history for s in recorded], [s.uncond_history for s in recorded],
                                 recorded[0].times)
    coefficients.meta.update(model=type(model).__name__, generations=generations)
    return coefficients


def guidance_trace(optimized) -> list[list[float]]:
    """Adaptive Guidance's per-step, per-sample cosine of the last generation (NaN where not measured)."""
    traces = _runtime(optimized).records.get(TRACE)
    if not traces:
        raise ValueError("no guidance state: optimize with ditfx.AdaptiveGuidance and run a generation first")
    return traces[-1]
