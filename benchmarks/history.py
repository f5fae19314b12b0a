"""History attention (ARD) on the digits model: the 4-step ARD and step-distilled students against their teacher.

The teacher is the shipped digits pipeline as the students were distilled from it: 50 Euler steps with
classifier-free guidance 1.5 (100 network evaluations a generation). The students sample in 4 steps without
guidance (4 evaluations): "ard" with history attention in the lower 2 of 6 blocks, "step" (plain step
distillation, the same training without history). The few-step teacher (4 steps with guidance) shows what the
distillation buys. For several seeds (the same labels, ``--per-class`` of each digit): digits-FD against the
held-out real digits, class accuracy by the shipped classifier, the FD between each method's samples and the
teacher's (same seed), PSNR against the teacher's image from the same noise, and the degradation of digits-FD
against the teacher. FLOPs are the cost model's (``ditfx.stats``); wall time is the median of interleaved rounds
of each method compiled by ditfx with ``--compiler`` (and the eager teacher).

    python benchmarks/history.py --json docs/results/history.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings

import torch
from reporting import write_json  # benchmarks/reporting.py, beside this script

import ditfx
from ditfx.models import digits
from ditfx.models.digits.metrics import fd_between
from ditfx.models.digits.sampling import class_grid
from ditfx.models.digits.students import STUDENTS, TEACHER, load_student

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def teacher_pipe(compiler: str | None):
    pipe = digits.pipeline()
    pipe.set_progress_bar_config(disable=True)
    if compiler is not None:
        ditfx.optimize(pipe, ditfx.Config(compiler=compiler))
    return pipe


def student_pipe(name: str, compiler: str):
    pipe = digits.pipeline(student=name, compiler=compiler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(method: str, pipe, labels, seed: int) -> tuple[torch.Tensor, float]:
    call = {"generator": torch.Generator().manual_seed(seed)}
    if method == "teacher":
        call.update(num_inference_steps=TEACHER["teacher_steps"], guidance_scale=TEACHER["guidance_scale"])
    elif method == "teacher 4 steps":
        call.update(num_inference_steps=4, guidance_scale=TEACHER["guidance_scale"])
    start = time.perf_counter()
    images = pipe(labels, **call).images
    return images, time.perf_counter() - start


def pipes(compiler: str | None) -> dict:
    made = {"teacher": teacher_pipe(compiler), "teacher 4 steps": teacher_pipe(compiler)}
    made.update({name: student_pipe(name, compiler or "eager") for name in STUDENTS})
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (0: no timing)")
    p.add_argument("--compiler", default="inductor", help="ditfx's inner backend in the timed rounds")
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    labels = class_grid(args.per_class)
    records = {name: load_student(name).record for name in STUDENTS}
    report = {"benchmark": "history", "settings": vars(args), "teacher": TEACHER,
              "students": {name: {k: v for k, v in r.items() if k != "loss_curve"} for name, r in records.items()},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "seeds": []}

    quality = pipes("eager")  # quality: ditfx with the eager inner backend (the students need ditfx's history)
    flops = {}
    for seed in args.seeds:
        images = {m: generate(m, pipe, labels, seed)[0] for m, pipe in quality.items()}
        teacher = images["teacher"]
        rows = {}
        for m, x in images.items():
            q = digits.metrics(x, labels, reference=teacher if m != "teacher" else None)
            q["fd_to_teacher"] = fd_between(x, teacher) if m != "teacher" else 0.0
            q["fd_degradation"] = q["fd"] - digits.metrics(teacher, labels)["fd"]
            rows[m] = q
            print(f"[seed {seed}] {m:<16} fd {q['fd']:7.1f} (vs teacher {q['fd_degradation']:+7.1f})  "
                  f"fd-to-teacher {q['fd_to_teacher']:6.1f}  acc {q['accuracy']:.3f}  "
                  f"psnr {q.get('psnr', float('inf')):5.1f}", file=sys.stderr)
        report["seeds"].append({"seed": seed, "methods": rows})
    for m, pipe in quality.items():
        s = ditfx.stats(pipe)
        flops[m] = {"flops_per_generation": s.flops / max(s.generations, 1), "nfe_per_generation":
                    s.nfe / max(s.generations, 1), "graph_breaks": s.graph_breaks, "recompiles": s.recompiles}
    report["flops"] = flops
    del quality
    torch._dynamo.reset()

    summary = {}
    for m in ("teacher 4 steps", *STUDENTS):
        per_seed = [r["methods"][m] for r in report["seeds"]]
        summary[m] = {k: statistics.mean(q[k] for q in per_seed)
                      for k in ("fd", "fd_degradation", "fd_to_teacher", "accuracy", "psnr")}
    summary["teacher"] = {k: statistics.mean(r["methods"]["teacher"][k] for r in report["seeds"])
                          for k in ("fd", "accuracy")}
    ard, step = summary["ard"], summary["step"]
    summary["ard_over_step"] = {
        "fd_degradation": ard["fd_degradation"] / step["fd_degradation"] if step["fd_degradation"] else None,
        "fd_to_teacher": ard["fd_to_teacher"] / step["fd_to_teacher"] if step["fd_to_teacher"] else None,
        "flops": flops["ard"]["flops_per_generation"] / flops["step"]["flops_per_generation"]}
    report["summary"] = summary
    print(f"ARD / step: fd degradation {summary['ard_over_step']['fd_degradation']}, fd-to-teacher "
          f"{summary['ard_over_step']['fd_to_teacher']:.3f}, flops {summary['ard_over_step']['flops']:.4f}",
          file=sys.stderr)

    if args.rounds > 0:
        timed = {"teacher eager": ("teacher", teacher_pipe(None)),
                 **{f"{m} ({args.compiler})": (m, pipe) for m, pipe in pipes(args.compiler).items()}}
        for method, pipe in timed.values():  # compile outside the rounds
            generate(method, pipe, labels, 0)
        times = {name: [] for name in timed}
        for _ in range(args.rounds):
            for name, (method, pipe) in timed.items():
                times[name].append(generate(method, pipe, labels, 0)[1])
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        report["wall_s"] = medians
        report["speedup_vs_teacher_eager"] = {n: medians["teacher eager"] / t for n, t in medians.items()}
        for n, t in medians.items():
            print(f"  {n:<28} {t:6.2f} s  {medians['teacher eager'] / t:6.1f}x", file=sys.stderr)
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
