"""ditfx.tune: the fastest configuration whose outputs stay inside a quality budget.

One study: the unaccelerated reference runs once on the calibration inputs (and once on the held-out ones); every
configuration the search asks for is compiled on a fresh copy of the model (its parameters shared, not copied) and
run on the calibration inputs; its outputs are measured against the reference's and its speed is the ratio of the
reference's FLOPs (the exact configuration's, from the cost model) to its own. The fastest points inside the budget
are then timed (wall clock, interleaved with the reference) and the winner is checked on the held-out inputs,
which the search never saw; a winner that leaves the budget there gives way to the next. Every evaluation is
written to ``workdir`` as it finishes, so an interrupted study resumes where it stopped; the study's key (its
signature: the model's label and a fingerprint of its weights, the run, the metric, the cases and the spaces) and
the reference outputs, which a resumed study reproduces first, keep another study's results out.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ditfx.api import denoiser_of, generation, optimize, runtime_of, stats
from ditfx.config import Config
from ditfx.tuning.metrics import measure
from ditfx.tuning.quality import QualityBudget
from ditfx.tuning.search import pareto_front, search
from ditfx.tuning.space import Space
from ditfx.validation import read_json_file

STATE_FORMAT = "ditfx.tune/2"
EXACT_TOLERANCE = 1e-4  # fp32: the exact configuration reproduces the reference run to rounding
SEARCH_COMPILER = "eager"
CONFIRM = 3  # the fastest points inside the budget that are timed, then checked first on the held-out inputs
HELD_OUT_CHECKS = 10  # points inside the budget tried on the held-out inputs before the exact config is returned
FINGERPRINT_SAMPLES = 64  # values of each weight tensor read into the fingerprint, besides the sum of all its bits
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # the fingerprint's bit views
# the signature's entries, as a message names them
SIGNATURE_WORDS = {"model": "model label", "weights": "model's weights", "run": "run", "metric": "budget's metric",
                   "calibration": "calibration cases", "held_out": "held-out cases", "spaces": "spaces"}


def case_seed(case) -> Any:
    """The seed of a case: the case itself (an int), or its ``"seed"`` entry (a dict)."""
    if isinstance(case, dict):
        if "seed" not in case:
            raise ValueError(f"a tuning case given as a dict needs a 'seed' entry, got {sorted(case)}")
        return case["seed"]
    return case


def check_cases(calibration: Sequence, held_out: Sequence) -> None:
    """Both sets non-empty, and no seed in both: what the search tunes on is never what it reports."""
    for name, cases in (("calibration", calibration), ("held_out", held_out)):
        if isinstance(cases, (str, bytes)) or not isinstance(cases, Sequence) or not cases:
            raise ValueError(f"tune: {name} must be a non-empty list of cases (seeds, or dicts with a 'seed'), "
                             f"got {cases!r}")
        listed = [repr(c) for c in cases]
        twice = sorted({c for c in listed if listed.count(c) > 1})
        if twice:
            raise ValueError(f"tune: {name} lists the case(s) {', '.join(twice)} more than once: each case is a "
                             "generation of its own, list each once")
    shared = sorted({repr(case_seed(c)) for c in calibration} & {repr(case_seed(c)) for c in held_out})
    if shared:
        raise ValueError(f"tune: calibration and held_out share seed(s) {', '.join(shared)}: the held-out check "
                         "must use inputs the search never saw; pick other seeds")


def check_output_file(name: str, path, suffixes: tuple[str, ...]) -> Path:
    """``path`` can be written, checked before any work: it ends in one of ``suffixes``, is not a directory, and its
    folder exists or can be made. ``name`` is the argument, as messages name it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (a str or a Path), got {type(path).__name__}")
    path = Path(path)
    if path.suffix not in suffixes:
        raise ValueError(f"{name} must be a path ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{name} {path} is a directory: give the path of a {suffixes[0]} file")
    _check_creatable(name, path.parent)
    return path


def check_directory(name: str, path) -> Path:
    """``path`` is a directory, or can be made one (checked before any work)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a directory path (a str or a Path), got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a directory: give a directory (it is made if missing)")
    _check_creatable(name, path)
    return path


def _check_creatable(name: str, folder: Path) -> None:
    """``folder`` exists or can be made: its nearest existing ancestor is a directory this process may write in."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} needs the folder {folder}, but {existing} is a file: give a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} needs to write in {existing}, which this process may not: give another path")


class Candidates:
    """Fresh copies of the user's model or pipeline to compile one configuration each: new module objects whose
    parameters and buffers are the original's (no memory copied), a copied scheduler, the user's object untouched.
    A copy is dropped, and with it its compiled graphs and runtime, when its evaluation ends."""

    def __init__(self, obj):
        self.obj = obj
        self.module, self.is_pipeline = denoiser_of(obj)
        self.tensors = {id(t): t for t in (*self.module.parameters(), *self.module.buffers())}

    def fresh_module(self):
        return copy.deepcopy(self.module, memo=dict(self.tensors))

    def fresh(self, module=None):
        """A copy of the pipeline around ``module`` (default: a fresh copy of its transformer), or a fresh module."""
        module = self.fresh_module() if module is None else module
        if not self.is_pipeline:
            return module
        shell = copy.copy(self.obj)
        if getattr(shell, "scheduler", None) is not None:
            shell.scheduler = copy.deepcopy(self.obj.scheduler)  # schedulers keep per-generation state
        shell.register_modules(transformer=module)
        return shell

    def optimized(self, config: Config):
        # the search compiles without codegen: the same outputs as any compiler, in a fraction of the time
        return optimize(self.fresh(), dataclasses.replace(config, compiler=SEARCH_COMPILER))


def _run_cases(run: Callable, target, cases: Sequence, marked: bool) -> tuple[torch.Tensor, float]:
    """``run(target, case)`` for every case, each a generation of its own (``marked``: in ``ditfx.generation``);
    the samples of all cases, concatenated."""
    outputs, start = [], time.perf_counter()
    for case in cases:
        if marked:
            with generation(target):
                out = run(target, case)
        else:
            out = run(target, case)
        outputs.append(_samples(out, case))
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) > 1:
        raise ValueError(f"tune: run(target, case) returned samples of the shapes {sorted(shapes)} for the cases "
                         f"{list(cases)}: every case must give samples of one shape (the same settings, another seed)")
    return torch.cat(outputs), time.perf_counter() - start


def _samples(out, case) -> torch.Tensor:
    """What ``run`` returned for ``case``, checked to be samples, as float32 on the CPU."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"tune: run(target, case) must return the generated samples as a tensor (e.g. a pipeline's "
                        f"images with output_type='pt'), got {type(out).__name__} for case {case!r}")
    if out.dim() == 0 or out.numel() == 0:
        raise ValueError(f"tune: run(target, case) must return the generated samples as a tensor with at least one "
                         f"dimension and one element, got shape {tuple(out.shape)} for case {case!r}")
    return out.detach().float().cpu()


def check_reference(name: str, cases: Sequence, outputs: torch.Tensor, earlier: Sequence = ()) -> None:
    """The reference run's outputs on ``cases`` can be measured against: finite, not one constant value, and other
    samples for every case (also than ``earlier``'s, the (case, samples) pairs of the calibration inputs)."""
    bad = int((~torch.isfinite(outputs)).sum())
    if bad:
        raise ValueError(f"tune: run(target, case) gave {bad} NaN or infinite value(s) of {outputs.numel()} with the "
                         f"plain model on the {name} inputs (the reference run): every configuration is measured "
                         "against these outputs, so they must be finite; fix run or the model (its dtype, scheduler "
                         "or inputs) before tuning")
    samples = list(zip(cases, outputs.chunk(len(cases))))
    for case, x in samples:
        first = x.flatten()[0]
        if bool((x == first).all()):
            raise ValueError(f"tune: run(target, case) returned samples of one constant value ({float(first):g}, "
                             f"shape {tuple(x.shape)}) for case {case!r}: PSNR, SSIM or FD against a constant "
                             "measure nothing; return the generated samples (e.g. a pipeline's images with "
                             "output_type='pt')")
    for i, (case, x) in enumerate(samples):
        for other, y in (*earlier, *samples[:i]):
            if torch.equal(x, y):
                raise ValueError(f"tune: run(target, case) returned the same samples for the cases {other!r} and "
                                 f"{case!r}: it must draw its noise (and whatever else varies) from the case, e.g. "
                                 "torch.Generator().manual_seed(case); the held-out check needs inputs the search "
                                 "never saw")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of ``module``'s parameters and buffers: their names, shapes and dtypes, the sum of all bits of each
    (its values read as integers: integer sums wrap the same in any order, so no device or thread count changes
    it, and any changed value does) and a few of its values at evenly spaced positions (values moved, not
    changed). One read of the weights where they live: a second or two for billions of parameters on a GPU."""
    digest = hashlib.sha256()
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        flat = tensor.detach().reshape(-1)
        bits = flat.view(_INTEGER_OF_SIZE.get(flat.element_size(), torch.uint8))
        picks = torch.linspace(0, bits.numel() - 1, min(FINGERPRINT_SAMPLES, bits.numel()), device=bits.device)
        total = int(bits.sum(dtype=torch.int64))
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {total}".encode())
        digest.update(bits[picks.long()].cpu().numpy().tobytes())
    return digest.hexdigest()


def _stable_repr(obj) -> str:
    """``repr(obj)`` without memory addresses (``<function f at 0x7f...>``: another in every process)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


class Store:
    """The study's evaluations on disk (``workdir/tune_state.json``, the reference outputs beside it)."""

    def __init__(self, workdir, signature: dict):
        self.dir = Path(workdir) if workdir is not None else None
        self.signature = signature
        self.points: dict[str, dict] = {}
        self.reference: dict[str, dict] = {}
        if self.dir is None:
            return
        path = self.dir / "tune_state.json"
        if path.exists():
            data = read_json_file(path, "ditfx.tune study state", STATE_FORMAT,
                                  f"use another workdir to start afresh, or delete {self.dir}")
            stored = data.get("signature", {})
            differ = [SIGNATURE_WORDS[k] for k in signature if stored.get(k) != signature[k]]
            if differ:
                raise ValueError(f"{path} holds another study (its {', '.join(differ)} differ from this one's): use "
                                 f"another workdir to start afresh, or delete {self.dir}")
            self.points, self.reference = data["points"], data["reference"]

    def outputs(self, name: str) -> torch.Tensor | None:
        """The stored reference outputs on the ``name`` inputs (None: not run yet)."""
        if name not in self.reference:
            return None
        path = self.dir / f"reference_{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"{path} is missing, but {self.dir / 'tune_state.json'} lists it: the study's measures "
                             f"cannot be checked; use another workdir to start afresh, or delete {self.dir}")
        return load_file(str(path))["outputs"]

    def check_same(self, name: str, stored: torch.Tensor, outputs: torch.Tensor) -> None:
        """A resumed study's reference run gives the stored outputs again, else its measures are another study's."""
        if stored.shape != outputs.shape:
            detail = f"shape {tuple(outputs.shape)}, stored {tuple(stored.shape)}"
        else:
            error = float((outputs - stored).abs().max())
            if error <= EXACT_TOLERANCE:
                return
            detail = f"by {error:.3g} (max abs)"
        raise ValueError(f"tune: the workdir {self.dir} holds a study whose reference run gave other outputs on the "
                         f"{name} inputs ({detail}): the model or run(target, case) changed since (e.g. its steps, "
                         f"scheduler or prompts); use another workdir to start afresh, or delete {self.dir}")

    def save_outputs(self, name: str, outputs: torch.Tensor) -> None:
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_file({"outputs": outputs.contiguous()}, str(self.dir / f"reference_{name}.safetensors"))

    def write(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path, tmp = self.dir / "tune_state.json", self.dir / "tune_state.json.partial"
        tmp.write_text(json.dumps({"format": STATE_FORMAT, "signature": self.signature, "reference": self.reference,
                                   "points": self.points}, indent=1, default=str))
        os.replace(tmp, path)


class Study:
    def __init__(self, obj, run, budget: QualityBudget, spaces: list[Space], calibration, held_out, workdir,
                 progress, label: str):
        self.candidates = Candidates(obj)
        self.obj, self.run, self.budget, self.spaces = obj, run, budget, spaces
        self.calibration, self.held_out = list(calibration), list(held_out)
        self.progress = progress
        self.store = Store(workdir, self.signature(label) if workdir is not None else {})
        self.announced: set[str] = set()
        self.space_names: dict[str, Space] = {}

    def signature(self, label: str) -> dict:
        """What decides the study's results, its key in a workdir. The run's repr where it tells its settings (a
        plain function's tells little: a resumed study also reproduces the reference outputs first)."""
        return {"model": label, "weights": weights_fingerprint(self.candidates.module), "run": _stable_repr(self.run),
                "metric": None if self.budget.metric is None else _stable_repr(self.budget.metric),
                "calibration": [repr(c) for c in self.calibration], "held_out": [repr(c) for c in self.held_out],
                "spaces": {s.name: {k.name: [repr(v) for v in k.values] for k in s.knobs} for s in self.spaces}}

    # ------------------------------------------------------------------------------------------- progress
    def say(self, text: str) -> None:
        if self.progress is True:
            print(f"[ditfx.tune] {text}", file=sys.stderr, flush=True)
        elif callable(self.progress):
            self.progress(text)

    # ------------------------------------------------------------------------------------------ reference
    def reference(self, name: str, cases, earlier: Sequence = ()) -> tuple[torch.Tensor, dict]:
        """The unaccelerated run's outputs and measures on ``cases`` (once per study, kept in the workdir; a resumed
        study runs it again on the calibration inputs, to check it is the same study). ``earlier``: the (case,
        samples) pairs the outputs must differ from."""
        stored = self.store.outputs(name)
        if stored is None or name == "calibration":
            self.say(f"reference run on the {name} inputs ({len(cases)} case(s))"
                     + ("" if stored is None else ": does it reproduce the workdir's?"))
            outputs, wall = _run_cases(self.run, self.obj, cases, marked=False)
            check_reference(name, cases, outputs, earlier)
            if stored is None:
                self.store.save_outputs(name, outputs)
                self.store.reference[name] = {"wall_s": wall}
            else:
                self.store.check_same(name, stored, outputs)
        else:
            outputs = stored
        record = self.store.reference[name]
        if "measures" not in record:
            record["measures"] = measure(outputs, outputs, self.budget.metric)
            self.store.write()
        self.check_measured(name, record["measures"])
        return outputs, record

    def check_measured(self, name: str, measures: dict) -> None:
        """The metric measures what the budget bounds, finitely, on the reference outputs (against themselves)."""
        for key in self.budget.bounded():
            value = measures.get(key)
            if value is None or not math.isfinite(value):
                raise ValueError(f"tune: the budget bounds {key!r}, but QualityBudget.metric returned {key}={value} "
                                 f"on the reference run's {name} outputs: return a finite {key!r} from metric, or "
                                 "leave the bound None")

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate_config(self, config: Config, cases, reference: torch.Tensor) -> dict:
        target = self.candidates.optimized(config)
        outputs, wall = _run_cases(self.run, target, cases, marked=True)
        s = stats(target)
        if not s.graphs:
            raise ValueError(f"tune: ditfx compiled nothing for {config!r}: run(target, case) never called the "
                             "optimized target it was given (or torch.compile is off in this process, e.g. "
                             "TORCHDYNAMO_DISABLE=1); run must generate with target (the plain model or pipeline for "
                             "the reference run, an optimized copy for each configuration), not a model of its own")
        if s.graphs_without_ditfx:
            # the fallbacks warned, but a warning shows once per place: the reasons go in the message
            why = "; ".join(dict.fromkeys(runtime_of(target).fallbacks))
            raise RuntimeError(f"tune: ditfx could not apply {config!r}: {s.graphs_without_ditfx} of {s.graphs} "
                               f"graph(s) ran without its passes ({why})")
        del target
        gc.collect()
        record = {"flops": s.flops, "nfe": s.nfe / max(s.generations, 1), "block_evals": s.block_evals,
                  "block_evals_skipped": s.block_evals_skipped, "wall_s": wall,
                  "measures": measure(outputs, reference, self.budget.metric),
                  "max_abs_error": float((outputs - reference).abs().max())}
        return record

    def evaluate(self, space: Space, point: tuple[int, ...]) -> dict:
        self.space_names.setdefault(space.name, space)
        config = space.config(point)
        key = repr(config)  # spaces (and choices) that build the same config share its evaluation
        record = self.store.points.get(key)
        if record is None:
            record = self.evaluate_config(config, self.calibration, self.ref_outputs)
            record.update(space=space.name, values={k: v for k, v in space.values(point).items()},
                          point=list(point))
            self.store.points[key] = record
            self.store.write()
        out = dict(self.annotate(record), key=key)
        if key not in self.announced:
            self.announced.add(key)
            self.say(self.describe(out))
        return out

    def annotate(self, record: dict) -> dict:
        """speed, quality and the budget verdict of a stored record (recomputed: a resumed study may change its
        budget)."""
        ref = self.ref_record["measures"]
        misses = self.budget.misses(record["measures"], ref)
        return dict(record, speed=self.ref_flops / max(record["flops"], 1), misses=misses,
                    usage=self.budget.usage(record["measures"], ref),
                    inside=all(v <= 1e-9 for v in misses.values()), quality=self.quality(record["measures"], ref))

    @staticmethod
    def quality(measures: dict, ref: dict) -> dict:
        q = {k: measures[k] for k in ("psnr", "ssim", "accuracy") if k in measures}
        if "fd" in measures and "fd" in ref:
            q["fd_change"] = abs(measures["fd"] - ref["fd"]) / max(abs(ref["fd"]), 1e-12)
        return q

    def describe(self, r: dict) -> str:
        values = " ".join(f"{k}={v}" for k, v in r["values"].items())
        q = r["quality"]
        parts = [f"{r['speed']:.2f}x FLOPs"] + [f"PSNR {q['psnr']:.1f}" if "psnr" in q else ""]
        if "fd_change" in q:
            parts.append(f"FD {'+' if r['measures']['fd'] >= self.ref_record['measures']['fd'] else '-'}"
                         f"{100 * q['fd_change']:.1f}%")
        if "accuracy" in q:
            parts.append(f"acc {100 * q['accuracy']:.1f}%")
        verdict = "inside" if r["inside"] else f"outside ({', '.join(_missed(r))})"
        return f"{len(self.store.points):3d} {r['space']} {values}: {', '.join(p for p in parts if p)}: {verdict}"

    # ------------------------------------------------------------------------------------------- the study
    def prepare(self) -> None:
        self.ref_outputs, self.ref_record = self.reference("calibration", self.calibration)
        space = self.spaces[0]
        record = self.store.points.get("exact")
        if record is None:
            self.say("the exact configuration (every knob at its exact value): FLOPs and exactness")
            record = self.evaluate_config(space.config((0,) * len(space.knobs)), self.calibration, self.ref_outputs)
            self.store.points["exact"] = dict(record, space="exact", values={}, point=[])
            self.store.write()
        if not record["max_abs_error"] <= EXACT_TOLERANCE:  # NaN included
            raise ValueError(f"tune: the exact configuration's outputs differ from the reference run's by "
                             f"{record['max_abs_error']:.3g} (max abs): run(target, case) must give the same "
                             "outputs every time for a case (seed its generator from the case)")
        self.ref_flops = record["flops"]
        self.ref_record.setdefault("flops", record["flops"])

    def timed(self, ranked: list[dict], rounds: int) -> None:
        """Wall time of the leading points, each against a reference run of its own round (compile excluded)."""
        case = self.calibration[:1]
        for r in ranked:
            if r.get("wall_rounds", 0) >= rounds:  # timed by an earlier run of a resumed study
                continue
            target = self.candidates.optimized(self.config_of(r))
            _run_cases(self.run, target, case, marked=True)  # compiles
            ratios = []
            for _ in range(rounds):
                _, ref_wall = _run_cases(self.run, self.obj, case, marked=False)
                _, wall = _run_cases(self.run, target, case, marked=True)
                ratios.append(ref_wall / wall)
            r["wall_speedup"] = sorted(ratios)[len(ratios) // 2]
            self.store.points[r["key"]].update(wall_speedup=r["wall_speedup"], wall_rounds=rounds)
            self.store.write()
            self.say(f"timed {r['space']} {r['values']}: {r['wall_speedup']:.2f}x wall ({r['speed']:.2f}x FLOPs)")
            del target
            gc.collect()

    def space_of(self, r: dict) -> Space:
        if r["space"] not in self.space_names:  # stored by an earlier run of a resumed study
            self.space_names.update((v.name, v) for s in self.spaces for v in s.variants())
        return self.space_names[r["space"]]

    def config_of(self, r: dict) -> Config:
        return self.space_of(r).config(tuple(r["point"]))


def _backed_off(study: Study, failed: dict, ranked: list[dict]) -> list[dict]:
    """``ranked`` with the one-notch-less-aggressive neighbours of a point that left the budget on the held-out
    inputs (each evaluated on the calibration inputs; those inside join, fastest first): a point at the budget's
    edge by chance is replaced by its nearest safer ones, not only by points the search happened to visit."""
    space = study.space_of(failed)
    known = {r["key"] for r in ranked} | {failed["key"]}
    for j, i in enumerate(failed["point"]):
        point = tuple(failed["point"][:j]) + (i - 1,) + tuple(failed["point"][j + 1:])
        if i == 0 or not any(point):
            continue
        r = study.evaluate(space, point)
        if r["inside"] and r["speed"] > 1.0 and r["key"] not in known:
            ranked.append(r)
            known.add(r["key"])
    timed = [r for r in ranked if "wall_speedup" in r]  # already in wall-time order
    return timed + sorted((r for r in ranked if "wall_speedup" not in r), key=lambda r: -r["speed"])


def tune(pipe_or_model, run: Callable, budget: QualityBudget | None = None,
         space: Space | Sequence[Space] | None = None, calibration: Sequence = (0,), held_out: Sequence = (1,),
         compiler: str = "inductor", workdir=None, timing: int = 1, progress: bool | Callable[[str], None] = True,
         out=None, label: str | None = None, margin: float = 0.1) -> Config:
    """The fastest configuration inside ``budget``: a :class:`~ditfx.Config` whose ``tuning`` holds the measured
    front, the chosen point's held-out check and the reference.

    * ``run(target, case) -> Tensor``: one generation of ``case`` (an int seed, or a dict with a ``"seed"``) with
      ``target`` (the plain model or pipeline for the reference, an optimized copy for every configuration), the
      samples as a tensor of at least one dimension and one element; it must seed its randomness from the case.
      The reference run's samples must be finite, not one constant value, and another for every case (else an
      error before the search); a configuration whose samples hold NaN or inf, or whose measures are NaN, is
      outside any budget.
    * ``budget``: :class:`QualityBudget` (default: PSNR >= 30 dB against the reference).
    * ``space``: a :class:`~ditfx.tuning.Space` or several (default: :func:`default_space`).
    * ``calibration`` / ``held_out``: the cases the search runs on, and those the winner is checked on; they share
      no seed.
    * ``compiler``: the returned config's (the search itself compiles with ``"eager"``: same outputs, no codegen).
    * ``workdir``: where evaluations are kept as they finish; a study started again with it resumes (its budget
      may change). A workdir whose study had another model label, weights, run, metric, cases or spaces is refused,
      and so is one whose reference outputs the reference run, run again on resuming, does not reproduce.
    * ``timing``: rounds of wall-clock timing for the fastest points inside the budget (0: FLOPs decide alone).
    * ``out``: save the returned config there (a ``.json`` path, ``ditfx.Config.load`` reads it); every argument,
      ``out`` and ``workdir`` included, is checked before any work.
    * ``margin``: on the held-out inputs a point must stay inside the budget tightened by ``margin``
      (``QualityBudget.tightened``: PSNR 1 dB higher at 0.1, FD within 9 % for 10 %): the fastest points sit at the
      budget's edge on the inputs they were found on, and inputs not seen yet move them by a few percent.
    """
    if not callable(run):
        raise TypeError(f"tune: run must be a callable run(target, case) -> outputs, got {type(run).__name__}")
    budget = check_settings(budget, calibration, held_out, compiler, workdir, timing, progress, out, label, margin)
    _check_plain(pipe_or_model)
    spaces = _spaces(space)
    if spaces is None:
        spaces = [default_space(pipe_or_model, run, calibration[0])]

    study = Study(pipe_or_model, run, budget, spaces, calibration, held_out, workdir, progress,
                  label or type(pipe_or_model).__name__)
    start = time.perf_counter()
    study.prepare()
    limits = {}
    for s in spaces:
        study.say(f"searching {s.name}: knobs {', '.join(k.name for k in s.knobs)}")
        limits[s.name] = search(s, study.evaluate)
    records = [dict(study.annotate(r), key=k) for k, r in study.store.points.items() if k != "exact"]
    inside = sorted((r for r in records if r["inside"] and r["speed"] > 1.0), key=lambda r: -r["speed"])
    ranked = inside[:CONFIRM]
    if timing and ranked:
        study.timed(ranked, timing)
        ranked.sort(key=lambda r: -r["wall_speedup"])
    # then the slower points inside the budget, fastest first: the first to pass the held-out check wins
    ranked += inside[CONFIRM:HELD_OUT_CHECKS]
    chosen, tried = None, bool(ranked)
    if ranked:
        calibrated = list(zip(study.calibration, study.ref_outputs.chunk(len(study.calibration))))
        held_ref, held_record = study.reference("held_out", study.held_out, earlier=calibrated)
        strict = budget.tightened(margin)
        checked = 0
        while ranked and checked < HELD_OUT_CHECKS:
            r = ranked.pop(0)
            checked += 1
            stored = study.store.points[r["key"]]
            if "held_out_measures" not in stored:
                stored["held_out_measures"] = study.evaluate_config(study.config_of(r), study.held_out,
                                                                    held_ref)["measures"]
                study.store.write()
            misses = budget.misses(stored["held_out_measures"], held_record["measures"])
            close = strict.misses(stored["held_out_measures"], held_record["measures"])
            r["held_out"] = {"measures": stored["held_out_measures"], "misses": misses,
                             "inside": all(v <= 1e-9 for v in close.values())}
            missed = _missed({"misses": misses, "measures": stored["held_out_measures"]})
            verdict = ("inside the budget" if r["held_out"]["inside"] else f"outside the budget ({', '.join(missed)})"
                       if missed else f"inside, but not by the margin ({margin:g} of an allowance)")
            study.say(f"held-out check of {r['space']} {r['values']}: {verdict}")
            if r["held_out"]["inside"]:
                chosen = r
                break
            ranked = _backed_off(study, r, ranked)
    seen = {r["key"] for r in records}  # and the points the held-out back-off evaluated
    records += [dict(study.annotate(r), key=k) for k, r in study.store.points.items()
                if k != "exact" and k not in seen]
    qualities = [("psnr", 1), ("ssim", 1), ("fd_change", -1), ("accuracy", 1)]
    front = pareto_front([r for r in records if not _broken(r)], qualities)
    tuning = {"format": STATE_FORMAT, "budget": budget.describe(), "margin": margin, "spaces": [s.name for s in spaces],
              "calibration": [repr(c) for c in study.calibration], "held_out": [repr(c) for c in study.held_out],
              "reference": _finite({"flops": study.ref_flops, **study.ref_record}),
              "evaluations": len(records), "seconds": round(time.perf_counter() - start, 1),
              "limits": limits,  # per space: each knob alone (every variant), the variant kept, the ascent's end
              "front": [_public(r) for r in front], "points": [_public(r) for r in records]}
    if chosen is not None:
        config = study.config_of(chosen)
        tuning["chosen"] = _public(chosen)
        study.say(f"chose {chosen['space']} {chosen['values']}: {chosen['speed']:.2f}x FLOPs"
                  + (f", {chosen['wall_speedup']:.2f}x wall" if "wall_speedup" in chosen else ""))
    else:
        config = spaces[0].config((0,) * len(spaces[0].knobs))
        misses = [r for r in records if not r["inside"]]
        closest = min(misses, key=lambda r: sum(min(v, 1e6) for v in r["misses"].values())) if misses else None
        tuning["chosen"] = None
        tuning["closest_miss"] = _public(closest) if closest else None
        if tried:
            why = (f"no point inside the budget on the calibration inputs stayed inside it (with margin {margin:g}) "
                   "on the held-out inputs")
        elif misses:
            why = "no accelerated point stays inside the budget"
        else:
            why = "no configuration of the space runs faster than the reference (nothing was skipped)"
        tuning["message"] = f"{why}: the reference (exact) configuration is returned"
        warnings.warn(f"ditfx.tune: {tuning['message']}" + (
            f"; the closest miss was {closest['space']} {closest['values']} ({', '.join(_missed(closest, by=True))})"
            if closest else ""),
            stacklevel=2)
    config = dataclasses.replace(config, compiler=compiler, tuning=tuning)
    if out is not None:
        config.save(out)
        study.say(f"wrote {out}")
    return config


def check_settings(budget, calibration, held_out, compiler, workdir, timing, progress, out, label,
                   margin) -> QualityBudget:
    """``tune``'s arguments but the model, the run and the spaces, checked before any work (the CLI checks its own
    with it before it loads a model); returns the budget (default: PSNR >= 30 dB)."""
    budget = QualityBudget() if budget is None else budget
    if not isinstance(budget, QualityBudget):
        raise TypeError(f"tune: budget must be a ditfx.QualityBudget, got {type(budget).__name__}")
    check_cases(calibration, held_out)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"tune: margin is a fraction of the budget's allowance in [0, 1), got {margin!r}")
    if isinstance(timing, bool) or not isinstance(timing, int) or timing < 0:
        raise ValueError(f"tune: timing is a number of rounds >= 0, got {timing!r}")
    Config(compiler=compiler)  # validates the name
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"tune: progress must be True (lines on stderr), False or None (silent), or a callable "
                        f"taking each line, got {type(progress).__name__}")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"tune: label must be a str (the model's name in the study's key), got {type(label).__name__}")
    if out is not None:
        check_output_file("tune: out", out, (".json",))
    if workdir is not None:
        check_directory("tune: workdir", workdir)
    return budget


def _check_plain(pipe_or_model) -> None:
    """A model or pipeline that ditfx has not optimized: tune compiles copies of it for every configuration."""
    try:
        denoiser_of(pipe_or_model)
    except TypeError:
        raise TypeError(f"tune: pipe_or_model must be an nn.Module (a DiT denoiser) or a diffusers pipeline with a "
                        f"'transformer', got {type(pipe_or_model).__name__}") from None
    try:
        runtime_of(pipe_or_model)
    except ValueError:
        return
    raise ValueError("tune takes the plain model or pipeline (it compiles copies of it for every configuration); "
                     "this one is optimized by ditfx already")


def _spaces(space) -> list[Space] | None:
    """``space`` as a list (None: not given, the default space is built)."""
    if space is None:
        return None
    spaces = [space] if isinstance(space, Space) else list(space) if isinstance(space, (list, tuple)) else []
    if not spaces or not all(isinstance(s, Space) for s in spaces) or len({s.name for s in spaces}) != len(spaces):
        raise ValueError(f"tune: space must be a ditfx.tuning.Space or a list of them with distinct names, got "
                         f"{space!r}")
    return spaces


def _missed(r: dict, by: bool = False) -> list[str]:
    """The bounds a record misses, each named with why: non-finite outputs or measures, or (``by``) how far."""
    words = []
    for k, v in r["misses"].items():
        if v <= 1e-9:
            continue
        if k == "non_finite":
            words.append(f"{r['measures']['non_finite']} NaN or infinite output value(s)")
        elif not math.isfinite(v):
            words.append(f"{k} {r['measures'].get(k)}, not finite")
        else:
            words.append(f"{k} over by {100 * v:.0f}% of its allowance" if by else k)
    return words


def _broken(r: dict) -> bool:
    """Outputs or measures that are not numbers: no trade-off to show on the front."""
    return "non_finite" in r["measures"] or any(math.isnan(v) for v in r["measures"].values())


def _public(r: dict) -> dict:
    keep = ("space", "values", "speed", "wall_speedup", "flops", "nfe", "block_evals", "wall_s", "measures",
            "quality", "misses", "inside", "held_out")
    return {k: _finite(r[k]) for k in keep if k in r}


def _finite(value):
    """JSON has no inf: an infinite PSNR (identical outputs) is written as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def default_space(pipe_or_model, run: Callable, case) -> Space:
    """Static cache (a schedule calibrated here on one calibration case), Adaptive Guidance, and no token budget
    (it needs an adapter distilled for the model: pass a space built with ``techniques(adapter=...)``)."""
    from ditfx.cache.calibration import calibrate
    from ditfx.tuning.space import techniques

    candidates = Candidates(pipe_or_model)

    def one_generation(model):
        run(candidates.fresh(model), case)

    schedule = calibrate(candidates.fresh_module(), one_generation, generations=1)
    return techniques(cache="static", schedule=schedule, guidance=True)
