"""Public API: optimize(), generation(), stats(), reset_stats(). (The calibrations that drive optimize live with
their techniques: ``ditfx.cache.calibration``, ``ditfx.guidance.calibration``.)"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ditfx.config import Config
from ditfx.model_facts import ModelFacts, null_class, repeated_blocks
from ditfx.runtime import diffusers_hook
from ditfx.runtime.parallel import trace_through_split_warnings
from ditfx.runtime.state import ModelRuntime
from ditfx.runtime.stats import Stats

_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def denoiser_of(obj) -> tuple[nn.Module, bool]:
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


def optimize(model_or_pipeline, config: Config | None = None):
    """Compile a DiT denoiser (or a pipeline's ``transformer``) with ditfx.

    Returns an object with the same call signature: for a module, a compiled module; for a pipeline, the
    same pipeline, its transformer compiled in place (``nn.Module.compile``). Configuration errors, including
    those that depend on the model, are raised here, before anything is compiled.

    A diffusers model gets one stateful hook in its hook registry, through which the pipeline states where
    generations end and which branch a call is (``cache_context``); a pipeline's scheduler counts the steps.
    """
    module, is_pipeline = denoiser_of(model_or_pipeline)
    if isinstance(getattr(module, "ditfx_runtime", None), ModelRuntime):
        return _bind_loaded(model_or_pipeline, module, is_pipeline, config)
    config = config or Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a ditfx.Config, got {type(config).__name__}")
    # the compiler stack is imported here, not with ditfx: a loaded package never needs it
    from ditfx.backend import DitfxBackend

    config.check_model(module)
    if config.compiler == "inductor" and all(p.device.type == "cpu" for p in module.parameters()):
        from ditfx.runtime.compiler import probe_cpu_in_background

        probe_cpu_in_background()
    runtime = ModelRuntime()
    runtime.module = weakref.ref(module)  # its context-parallel group, read at every call
    if hasattr(module, "enable_parallelism"):  # a diffusers model: its context parallelism may log while traced
        trace_through_split_warnings()
    backend = DitfxBackend(config, runtime, ModelFacts.of(module))
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


def runtime_of(obj) -> ModelRuntime:
    """The runtime of what :func:`optimize` returned (or a pipeline around it, or a loaded package)."""
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


def record_generations(model: nn.Module, config: Config, run: Callable[[nn.Module], object], generations: int,
                       progress: Callable[[int], None] | None = None, what: str = "calibrate") -> ModelRuntime:
    """``model`` optimized with ``config`` (a recording technique), then ``generations`` generations of
    ``run(optimized)``, each one marked; the model's runtime, whose records hold what its policies recorded (the
    calibrations read them). ``what`` names the caller in errors."""
    if generations < 1:
        raise ValueError(f"{what} needs at least one generation, got {generations}")
    compiled = optimize(model, config)
    for g in range(generations):
        with generation(compiled):
            run(compiled)
        if progress is not None:
            progress(g + 1)
    return runtime_of(compiled)


_runtime = runtime_of  # its earlier name, which tests (and scripts) use


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
    """Counters of everything the optimized model ran (see :class:`~ditfx.runtime.stats.Stats`)."""
    return runtime_of(optimized).snapshot()


def reset_stats(optimized) -> None:
    runtime = runtime_of(optimized)
    runtime.stats = Stats(graphs=runtime.stats.graphs, graphs_without_ditfx=runtime.stats.graphs_without_ditfx)


@contextlib.contextmanager
def generation(optimized) -> Iterator[None]:
    """Mark one generation explicitly (in this thread): state starts fresh on entry and is freed on exit."""
    lifecycle = runtime_of(optimized).lifecycle
    lifecycle.enter_generation()
    try:
        yield
    finally:
        lifecycle.exit_generation()


__all__ = ["denoiser_of", "generation", "null_class", "optimize", "record_generations", "repeated_blocks",
           "reset_stats", "runtime_of", "stats"]
