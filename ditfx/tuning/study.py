"""ditfx.tune: the fastest configuration whose outputs stay inside a quality budget.

One study: the unaccelerated reference runs once on the calibration inputs (and once on the held-out ones); every
configuration the search asks for is compiled on a fresh copy of the model (its parameters shared, not copied) and
run on the calibration inputs; its outputs are measured against the reference's and its speed is the ratio of the
reference's FLOPs (the exact configuration's, from the cost model) to its own. The fastest points inside the budget
are then timed (wall clock, interleaved with the reference) and the winner is checked on the held-out inputs,
which the search never saw; a winner that leaves the budget there gives way to the next. Every evaluation is
written to ``workdir`` as it finishes, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
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

STATE_FORMAT = "ditfx.tune/1"
EXACT_TOLERANCE = 1e-4  # fp32: the exact configuration reproduces the reference run to rounding
SEARCH_COMPILER = "eager"
CONFIRM = 3  # the fastest points inside the budget that are timed, then checked first on the held-out inputs
HELD_OUT_CHECKS = 10  # points inside the budget tried on the held-out inputs before the exact config is returned


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
    shared = sorted({repr(case_seed(c)) for c in calibration} & {repr(case_seed(c)) for c in held_out})
    if shared:
        raise ValueError(f"tune: calibration and held_out share seed(s) {', '.join(shared)}: the held-out check "
                         "must use inputs the search never saw; pick other seeds")


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
    """``run(target, case)`` for every case, each a generation of its own (``marked``: in ``ditfx.generation``)."""
    outputs, start = [], time.perf_counter()
    for case in cases:
        if marked:
            with generation(target):
                out = run(target, case)
        else:
            out = run(target, case)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"tune: run(target, case) must return the outputs as a tensor (e.g. a pipeline's "
                            f"images with output_type='pt'), got {type(out).__name__}")
        outputs.append(out.detach().float().cpu())
    return torch.cat(outputs), time.perf_counter() - start


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
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT or data.get("signature") != signature:
                raise ValueError(f"{path} holds another study (its model, run settings, cases or space differ): "
                                 "use another workdir to start afresh, or delete it")
            self.points, self.reference = data["points"], data["reference"]

    def outputs(self, name: str) -> torch.Tensor | None:
        path = self.dir / f"reference_{name}.safetensors" if self.dir else None
        return load_file(str(path))["outputs"] if path is not None and path.is_file() else None

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
        signature = {"model": label, "calibration": [repr(c) for c in self.calibration],
                     "held_out": [repr(c) for c in self.held_out],
                     "spaces": {s.name: {k.name: [repr(v) for v in k.values] for k in s.knobs} for s in spaces}}
        self.store = Store(workdir, signature)
        self.announced: set[str] = set()
        self.space_names: dict[str, Space] = {}

    # ------------------------------------------------------------------------------------------- progress
    def say(self, text: str) -> None:
        if self.progress is True:
            print(f"[ditfx.tune] {text}", file=sys.stderr, flush=True)
        elif callable(self.progress):
            self.progress(text)

    # ------------------------------------------------------------------------------------------ reference
    def reference(self, name: str, cases) -> tuple[torch.Tensor, dict]:
        """The unaccelerated run's outputs and measures on ``cases`` (once per study, kept in the workdir)."""
        outputs = self.store.outputs(name)
        if outputs is None or name not in self.store.reference:
            self.say(f"reference run on the {name} inputs ({len(cases)} case(s))")
            outputs, wall = _run_cases(self.run, self.obj, cases, marked=False)
            self.store.save_outputs(name, outputs)
            self.store.reference[name] = {"wall_s": wall}
        record = self.store.reference[name]
        if "measures" not in record:
            record["measures"] = measure(outputs, outputs, self.budget.metric)
            self.store.write()
        return outputs, record

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate_config(self, config: Config, cases, reference: torch.Tensor) -> dict:
        target = self.candidates.optimized(config)
        outputs, wall = _run_cases(self.run, target, cases, marked=True)
        s = stats(target)
        if s.graphs_without_ditfx or not s.graphs:
            raise RuntimeError(f"tune: ditfx did not compile the model for {config!r} ({s.graphs_without_ditfx} of "
                               f"{s.graphs} graph(s) fell back to plain compilation; see the warnings above)")
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
        missed = ", ".join(k for k, v in r["misses"].items() if v > 1e-9)
        verdict = "inside" if r["inside"] else f"outside ({missed})"
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
        if record["max_abs_error"] > EXACT_TOLERANCE:
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
      outputs as a tensor; it must seed its randomness from the case.
    * ``budget``: :class:`QualityBudget` (default: PSNR >= 30 dB against the reference).
    * ``space``: a :class:`~ditfx.tuning.Space` or several (default: :func:`default_space`).
    * ``calibration`` / ``held_out``: the cases the search runs on, and those the winner is checked on; they share
      no seed.
    * ``compiler``: the returned config's (the search itself compiles with ``"eager"``: same outputs, no codegen).
    * ``workdir``: where evaluations are kept as they finish; a study started again with it resumes.
    * ``timing``: rounds of wall-clock timing for the fastest points inside the budget (0: FLOPs decide alone).
    * ``out``: save the returned config there (JSON, ``ditfx.Config.load`` reads it).
    * ``margin``: on the held-out inputs a point must stay inside the budget tightened by ``margin``
      (``QualityBudget.tightened``: PSNR 1 dB higher at 0.1, FD within 9 % for 10 %): the fastest points sit at the
      budget's edge on the inputs they were found on, and inputs not seen yet move them by a few percent.
    """
    if not callable(run):
        raise TypeError(f"tune: run must be a callable run(target, case) -> outputs, got {type(run).__name__}")
    budget = QualityBudget() if budget is None else budget
    if not isinstance(budget, QualityBudget):
        raise TypeError(f"tune: budget must be a ditfx.QualityBudget, got {type(budget).__name__}")
    check_cases(calibration, held_out)
    try:
        runtime_of(pipe_or_model)
    except ValueError:
        pass
    else:
        raise ValueError("tune takes the plain model or pipeline (it compiles copies of it for every configuration); "
                         "this one is optimized by ditfx already")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"tune: margin is a fraction of the budget's allowance in [0, 1), got {margin!r}")
    if isinstance(timing, bool) or not isinstance(timing, int) or timing < 0:
        raise ValueError(f"tune: timing is a number of rounds >= 0, got {timing!r}")
    Config(compiler=compiler)  # validates the name before any work
    spaces = [space] if isinstance(space, Space) else list(space) if space is not None else None
    if spaces is None:
        spaces = [default_space(pipe_or_model, run, calibration[0])]
    if not spaces or not all(isinstance(s, Space) for s in spaces) or len({s.name for s in spaces}) != len(spaces):
        raise ValueError("tune: space must be a ditfx.tuning.Space or a list of them with distinct names")

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
        held_ref, held_record = study.reference("held_out", study.held_out)
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
            verdict = ("inside the budget" if r["held_out"]["inside"] else "outside the budget" if any(
                v > 1e-9 for v in misses.values()) else f"inside, but not by the margin ({margin:g} of an allowance)")
            study.say(f"held-out check of {r['space']} {r['values']}: {verdict}")
            if r["held_out"]["inside"]:
                chosen = r
                break
            ranked = _backed_off(study, r, ranked)
    seen = {r["key"] for r in records}  # and the points the held-out back-off evaluated
    records += [dict(study.annotate(r), key=k) for k, r in study.store.points.items()
                if k != "exact" and k not in seen]
    qualities = [("psnr", 1), ("ssim", 1), ("fd_change", -1), ("accuracy", 1)]
    front = pareto_front(records, qualities)
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
            f"; the closest miss was {closest['space']} {closest['values']} ({_miss_text(closest)})"
            if closest else ""),
            stacklevel=2)
    config = dataclasses.replace(config, compiler=compiler, tuning=tuning)
    if out is not None:
        config.save(out)
        study.say(f"wrote {out}")
    return config


def _miss_text(r: dict) -> str:
    return ", ".join(f"{k} over by {100 * v:.0f}% of its allowance" for k, v in r["misses"].items() if v > 1e-9)


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
