"""``ditfx.export``: capture the model with ditfx's backend, plan it, and write a package that
:func:`ditfx.load` runs without the model's code (the format: :mod:`ditfx.package`)."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from ditfx.config import Config
from ditfx.package import manifest as manifest_io
from ditfx.package.artifacts import DYNAMIC, compile_artifact, export_variant, needed_rows, needed_variants
from ditfx.package.call import CallSpec, walk
from ditfx.plan import Plan, VariantUnavailable
from ditfx.runtime.parallel import context_parallel_group


class ExportError(ValueError):
    """A model or config that cannot be exported: what, and what to do."""


WORK_SUFFIX = ".ditfx-partial"  # a build's work directory beside the package: .<name>.<random>.ditfx-partial


def export(model_or_optimized, path, example_inputs=None, config: Config | None = None,
           progress: Callable[[str], None] | None = None, overwrite: bool = False, jobs: int | None = None) -> Path:
    """Write the package of a DiT denoiser (or a pipeline's ``transformer``, or what :func:`ditfx.optimize`
    returned) to the directory ``path``, for the device its weights are on.

    ``example_inputs``: one call's arguments, a dict of keyword arguments or a tuple of positional ones (for an
    optimized model or pipeline: the inputs of the call shape to serve). The package serves calls of these shapes
    (the batch rows may vary where the graph allows it); every non-tensor argument is fixed to its value here.
    ``config``: the techniques (default: the optimized model's, else ``Config()``); every policy it sets runs
    when loaded, with its schedules and coefficients stored in the package. ``progress`` is called with one line
    per step. ``jobs``: processes that compile the artifacts (default: one per core). Returns the package's path.
    """
    from ditfx.api import denoiser_of

    start = time.perf_counter()
    say = progress or (lambda line: None)
    module, _ = denoiser_of(model_or_optimized)
    module = getattr(module, "_orig_mod", module)
    if config is None:
        config = _config_of(model_or_optimized) or Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a ditfx.Config, got {type(config).__name__}")
    if context_parallel_group(module) is not None:
        raise ExportError("cannot export a model with diffusers' context parallelism enabled: its graphs hold this "
                          "rank's collectives and rank; export the model before enable_parallelism, on one process")
    args, kwargs = _example(example_inputs)
    _check_rows(args, kwargs)
    path = Path(path)
    _check_target(path, overwrite)
    config.check_model(module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))

    say("capturing the model and building the plan")
    plan, spec, stored = capture(module, config, args, kwargs)
    with _writing(path, overwrite) as work:
        _write(work, plan, spec, stored, say, jobs)
        manifest_io.write(work, {**manifest_io.target(device), "model_class": _qualname(module),
                                 "config": repr(config), "build_seconds": round(time.perf_counter() - start, 1)})
    say(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return path


@contextlib.contextmanager
def _writing(path: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh work directory beside ``path`` to write the package in, marked as ditfx's: it replaces ``path`` only
    once complete (a failed build leaves the old package as it was) and is removed on failure. Work directories
    of builds whose process is gone (killed) are removed first; nothing without ditfx's mark is touched."""
    path = Path(os.path.abspath(path))  # a name and a folder to work beside, for "." or "out/.." too
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{WORK_SUFFIX}"):
        if _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    # not tempfile.mkdtemp: its folder is private to this user (0700), and the package would stay so
    work = path.parent / f".{path.name}.{secrets.token_hex(6)}{WORK_SUFFIX}"
    work.mkdir()
    (work / manifest_io.WORK_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield work
        (work / manifest_io.WORK_MARKER).unlink()
        _swap(work, path, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _abandoned(work: Path) -> bool:
    """Whether ``work`` is the work directory of a ditfx build on this machine whose process is gone."""
    try:
        owner = json.loads((work / manifest_io.WORK_MARKER).read_text())
    except (OSError, ValueError):  # not ditfx's, or its mark not written yet: left alone
        return False
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname() or work.is_symlink():
        return False
    try:
        os.kill(pid, 0)  # signal 0: whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _swap(work: Path, path: Path, overwrite: bool) -> None:
    """Put the finished ``work`` at ``path``. What is there (checked again: it may have changed during the build)
    is renamed aside first and removed only once the new package is in place."""
    if not path.exists():
        work.rename(path)
        return
    _check_target(path, overwrite)
    aside = work.with_name(work.name.removesuffix(WORK_SUFFIX) + ".ditfx-old")
    path.rename(aside)
    try:
        work.rename(path)
    except BaseException:
        aside.rename(path)
        raise
    shutil.rmtree(aside)


def _example(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise ExportError("example_inputs must be one call's arguments: a dict of keyword arguments or a tuple of "
                      f"positional ones, got {type(example_inputs).__name__}")


def _check_rows(args: tuple, kwargs: dict) -> None:
    """Refuse example tensors of 0 rows before any work (the captured call would fail deep in the runtime)."""
    leaves: dict = {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        walk(value, (str(key),), leaves, {})
    empty = [".".join(p) for p, t in leaves.items() if t.dim() and t.shape[0] == 0]
    if empty:
        raise ExportError(f"example_inputs {empty} have 0 rows: export needs an example call of at least one row "
                          "(the batch the package serves)")


def _config_of(obj) -> Config | None:
    from ditfx.api import runtime_of

    try:
        return runtime_of(obj).config
    except ValueError:
        return None


def _qualname(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def capture(module: torch.nn.Module, config: Config, args: tuple, kwargs: dict) -> tuple[Plan, CallSpec, dict]:
    """Capture one call of ``module`` with ditfx's backend (its regions run uncompiled: only the plan is needed)
    and record its call interface."""
    from ditfx.backend import DitfxBackend
    from ditfx.graph import meta
    from ditfx.model_facts import ModelFacts
    from ditfx.runtime.state import ModelRuntime

    runtime = ModelRuntime()
    backend = DitfxBackend(dataclasses.replace(config, compiler="eager"), runtime, ModelFacts.of(module))
    seen: list = []

    def recording(gm, example_inputs):
        executor = backend(gm, example_inputs)
        users = [meta.user_input_name(p) for p in gm.graph.find_nodes(op="placeholder")]

        def run(*inputs):
            result = executor(*inputs)
            seen.append((list(example_inputs), users, result))
            return result

        return run

    torch._dynamo.reset()
    # the forward, not the module: a module compiled in place (an optimized pipeline's transformer) would run
    # its own compiled call
    compiled = torch.compile(module.forward, backend=recording, dynamic=False)
    lifecycle = runtime.lifecycle
    try:
        lifecycle.enter_generation()  # the capture call is one generation of its own (history attention asks)
        with torch.no_grad():
            user_result = compiled(*args, **kwargs)
    finally:
        lifecycle.exit_generation()
        torch._dynamo.reset()
    if runtime.fallbacks or len(runtime.executors) != 1 or len(seen) != 1:
        why = "; ".join(runtime.fallbacks) or f"Dynamo captured {len(runtime.executors)} graphs"
        raise ExportError(f"cannot export {type(module).__name__}: ditfx does not run it as one graph ({why}). "
                          "Export needs the whole model in one graph with every technique on")
    executor = runtime.executors[0]
    example, users, graph_result = seen[0]
    dataclass_result = None
    if "return_dict" in kwargs and kwargs["return_dict"] is False:
        with torch.no_grad():  # the model's output class, for calls with return_dict=True (eager: the forward)
            dataclass_result = module.forward(*args, **{**kwargs, "return_dict": True})
    spec, stored = CallSpec.record(module, args, kwargs, example, executor.io.input_names, users, graph_result,
                                   user_result, dataclass_result)
    return executor.plan, spec, stored


def _write(directory: Path, plan: Plan, spec: CallSpec, stored: dict, say, jobs: int | None) -> None:
    from safetensors.torch import save_file

    from ditfx.plan_io import plan_to_json

    (directory / "call.json").write_text(json.dumps(spec.to_json(), indent=1))
    unique: dict[int, str] = {}
    weights = {}
    for key, t in stored.items():  # tied weights are stored once, read under every name
        weights[key] = t.detach().contiguous().cpu().clone() if id(t) not in unique else weights[unique[id(t)]]
        unique.setdefault(id(t), key)
    save_file(weights, str(directory / "weights.safetensors"))
    plans = [("", plan), *((f"{name}.", sub) for name, sub in plan.modes.items())]
    compiles = []
    for prefix, p in plans:
        tables = []
        plan_dir = directory / "plan" / ("modes/" + prefix.rstrip(".") if prefix else "")
        plan_dir.mkdir(parents=True, exist_ok=True)
        for n, (rm, transforms) in enumerate(needed_variants(p)):
            for ep, entry in _export_variant(p, rm, transforms, say):
                entry.name = f"{prefix}{n}.{entry.rows}.pt2"
                ep.example_inputs = None  # zeros as large as the weights: entry.example keeps their shapes
                (directory / "programs").mkdir(exist_ok=True)
                torch.export.save(ep, directory / "programs" / entry.name)
                compiles.append((entry, f"{rm.region.name}{' ' + '+'.join(transforms) if transforms else ''}"))
                tables.append(entry)
        data = plan_to_json(p, plan_dir)
        data["artifacts"] = [e.to_json() for e in tables]
        (plan_dir / "plan.json").write_text(json.dumps(data, indent=1))
    compile_programs(directory, directory, compiles, jobs, say)


def _export_variant(plan: Plan, rm, transforms, say) -> list:
    """The exported programs of one variant: dynamic batch where export allows it, else one per row count the
    runtime may ask for."""
    what = f"{rm.region.name}{' ' + '+'.join(transforms) if transforms else ''}"
    if plan.io.rows and plan.io.rows > 1:
        try:
            return [export_variant(plan, rm, transforms, DYNAMIC)]
        except ValueError as e:
            say(f"  {what}: no dynamic batch ({e}); one artifact per row count")
    built = []
    for r in needed_rows(plan):
        try:
            built.append(export_variant(plan, rm, transforms, r))
        except VariantUnavailable as e:
            say(f"  {what} on {r} rows: unavailable ({e}); those calls compute every row")
    return built


def compile_programs(source: Path, directory: Path, compiles: list, jobs: int | None, say,
                     device: torch.device | None = None) -> None:
    """AOTInductor-compile ``source/programs/<entry.name>`` into ``directory/artifacts`` for each (entry, label),
    in ``jobs`` worker processes (default: one per core, at most one per program): compiling is mostly the C++
    compiler, one core each. Each worker compiles its share of the programs one after the other: it imports torch,
    Inductor and ditfx's kernels once (about 5 s of a 10 s compile on a tiny model)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(compiles)))
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    work = [(str(source / "programs" / e.name), e.to_json(), str(directory / "artifacts" / e.name),
             str(directory / "programs" / e.name), str(device) if device is not None else None) for e, _ in compiles]
    labels = [f"{label} (batch {e.to_json()['rows']})" for e, label in compiles]
    say(f"compiling {len(work)} artifacts with AOTInductor ({jobs} process{'es' if jobs > 1 else ''})")
    if jobs == 1:
        for job, label in zip(work, labels):
            say(f"  compiled {label} in {_compile_job(*job):.1f} s")
        return
    # fresh interpreters, not multiprocessing: a spawned worker would import the caller's __main__ (a script
    # without a __main__ guard would run again), and a forked one inherits torch's thread pools
    shares = [list(range(k, len(work), jobs)) for k in range(jobs)]
    workers: list[_Worker] = []
    with ThreadPoolExecutor(jobs) as pool:
        try:
            for share in shares:
                workers.append(_Worker([work[i] for i in share], [labels[i] for i in share]))
            for future in as_completed([pool.submit(worker.follow, say) for worker in workers]):
                future.result()
        finally:  # one failed, or the build was interrupted: the others stop now, not when done
            for worker in workers:
                worker.stop()


# A compile worker's program, its parent's pid its argument. Its first lines, before it imports torch (seconds, more
# on a busy machine), watch the parent: a build killed by a signal (SIGTERM at a job scheduler's time limit) runs no
# cleanup, and its workers would go on writing into its work directory. Once the parent is gone, the worker ends
# with its session: itself and the C++ compilers it started.
_WORKER = """
import os, signal, sys, threading, time

def watch(parent):
    while os.getppid() == parent:
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)

threading.Thread(target=watch, args=(int(sys.argv[1]),), daemon=True).start()
from ditfx.package.build import compile_share
compile_share()
"""


class _Worker:
    """A worker process compiling its share of the artifacts (``_WORKER``). It leads a session of its own, so that
    stopping it stops the C++ compilers it runs, and ends itself when this process ends."""

    def __init__(self, share: list[tuple], labels: list[str]):
        self.share, self.labels = share, labels
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER, str(os.getpid())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
                                        start_new_session=True)
        self.process.stdin.write(json.dumps(share))
        self.process.stdin.close()

    def follow(self, say) -> None:
        """Report each artifact as the worker finishes it; raise if it fails."""
        with self.errors, self.process.stdout:
            done = 0
            for line in self.process.stdout:  # "<index in share> <seconds>" per compiled artifact
                k, seconds = line.split()
                say(f"  compiled {self.labels[int(k)]} in {float(seconds):.1f} s")
                done += 1
            if self.process.wait() != 0:
                self.errors.seek(0)
                failed = Path(self.share[done][0]).name if done < len(self.share) else "an artifact"
                raise RuntimeError(f"compiling {failed} with AOTInductor failed:\n{self.errors.read()[-4000:]}")

    def stop(self) -> None:
        """Kill the worker and its compilers, unless it is done."""
        if self.process.poll() is None:  # not yet reaped: its pid, and so its session's, is still its own
            with contextlib.suppress(ProcessLookupError):  # reaped meanwhile by follow
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _compile_job(program: str, entry: dict, artifact: str, saved: str, device: str | None) -> float:
    """One artifact from one saved program (run in a worker process); its compile seconds."""
    from ditfx.package.artifacts import ArtifactEntry

    start = time.perf_counter()
    importlib.import_module("ditfx.kernels")  # ditfx's ops, which a program with Config(kernels=True) calls
    ep = torch.export.load(program)
    if device is not None:  # a rebuild for another device type
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, torch.device(device))
    compile_artifact(ep, ArtifactEntry.from_json(entry), Path(artifact), Path(saved))
    return time.perf_counter() - start


def rebuild(package, path, device=None, progress: Callable[[str], None] | None = None,
            overwrite: bool = False, jobs: int | None = None) -> Path:
    """Compile the package at ``package`` again, from its exported programs, for this machine and ``device``
    (default: the package's device type), into ``path`` (which may be ``package`` itself, with ``overwrite``): no
    model code needed; the plan, call interface and weights are copied. For another torch version, device type, GPU
    architecture or CPU ISA. The package is checked as :func:`ditfx.load` checks it (every file's digest, every
    JSON file's shape) before any work."""
    from ditfx.package.loaded import plans, read_package

    start = time.perf_counter()
    say = progress or (lambda line: None)
    package, path = Path(package), Path(path)
    manifest = manifest_io.read_fields(package)
    manifest_io.verify_files(package, manifest)  # a rebuild must not sign files edited after export
    _, plan = read_package(package, manifest)
    compiles = [(entry, entry.name) for p in plans(plan) for entries in p.artifacts.values() for entry in entries]
    for entry, _ in compiles:
        if not (package / "programs" / entry.name).is_file():
            raise manifest_io.PackageError(f"{package / 'programs' / entry.name} is missing: the package holds no "
                                           "program to compile that artifact from; export it again")
    device, target = _rebuild_target(device, manifest)
    _check_apart(package, path)
    _check_target(path, overwrite)
    with _writing(path, overwrite) as work:
        shutil.copytree(package, work, ignore=shutil.ignore_patterns("artifacts", "programs", manifest_io.MANIFEST),
                        dirs_exist_ok=True)
        compile_programs(package, work, compiles, jobs, say, device if str(device) != manifest["device"] else None)
        fields = {k: v for k, v in manifest.items() if k not in ("format", "ditfx", "torch", "files", "device", "arch")}
        fields["build_seconds"] = round(time.perf_counter() - start, 1)
        manifest_io.write(work, {**target, **fields})
    say(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return path


def _rebuild_target(device, manifest: dict) -> tuple[torch.device, dict]:
    """The device to rebuild for and what its code depends on here (:func:`manifest.target`), before any work."""
    name = device if device is not None else manifest["device"]
    try:
        device = torch.device(name)
        return device, manifest_io.target(device)
    except (RuntimeError, AssertionError, TypeError) as e:  # no such device type, or none of it here
        raise ValueError(f"cannot rebuild for device {name!r} (--device) on this machine: {e}") from None


def _check_apart(package: Path, path: Path) -> None:
    """Refuse a rebuild into a folder of the package, or over a folder holding it (the package itself is fine: it is
    read before it is replaced)."""
    source, target = package.resolve(), path.resolve()
    if source in target.parents or target in source.parents:
        raise ValueError(f"the rebuilt package {path} and the package {package} hold one another: give a path "
                         "outside the package (or the package itself, with --overwrite)")


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write a package at ``path`` where something other than a package is, or a package unless asked to
    replace it, or inside a package (its files would no longer be the ones its manifest lists). Nothing is removed
    here: the old package goes only once the new one is complete."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} is a file or a link, not a package directory: give another path")
    holder = next((p for p in Path(os.path.abspath(path)).parents if (p / manifest_io.MANIFEST).is_file()), None)
    if holder is not None:
        raise FileExistsError(f"{path} is inside the package {holder}: give a path outside it")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True (--overwrite) or another path")
        if not (path / manifest_io.MANIFEST).is_file():
            raise FileExistsError(f"{path} is not a ditfx package ({manifest_io.MANIFEST} missing); refusing to "
                                  "overwrite it: give another path")


def compile_share() -> None:
    """A worker of :func:`compile_programs` (its program: ``_WORKER``): its share of the jobs from stdin, one line
    per compiled artifact."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # the workers are one per core already: no pool of pools
    for index, job in enumerate(json.load(sys.stdin)):
        print(index, _compile_job(*job), flush=True)
