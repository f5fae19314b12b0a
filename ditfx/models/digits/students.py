"""The digits model's 4-step students: ARD (history attention in the lower 2 of 6 blocks) and plain step
distillation (no history), distilled from the 50-step guided (CFG 1.5, as in the demo) digits pipeline.

    python -m ditfx.models.digits.students --trajectories /tmp/digits_trajectories.safetensors
    python -m ditfx.models.digits.students --student ard --trajectories /tmp/digits_trajectories.safetensors
    python -m ditfx.models.digits.students --student step --trajectories /tmp/digits_trajectories.safetensors

The first records the teacher's trajectories at the student's 4 noise levels (the data both students share);
each of the others distils a student (:func:`ditfx.history.distill`) on them (or records them first when the file
does not exist) and writes ``student_<name>.safetensors`` (weights, step heads, schedule, record) and
``student_<name>_loss.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from ditfx.history.distillation import POINTS, Trajectories, distill, record_trajectories
from ditfx.history.student import HistoryStudent

from .shipped import WEIGHTS_DIR, shipped_file

STUDENTS = {"ard": 2, "step": 0}  # history layers of each shipped student
STEPS = 4
TEACHER = {"teacher_steps": 50, "guidance_scale": 1.5}
COMMAND = ("python -m ditfx.models.digits.students --student {name} --out ditfx/models/digits/weights --minutes 30 "
           "--trajectories /tmp/digits_trajectories.safetensors")
GENERATION_BATCH = 64


def student_file(name: str) -> str:
    return f"student_{name}.safetensors"


def trajectory_run(pipe, index: int, **call):
    """Generation ``index`` of the recording: 64 random labels drawn from a generator seeded by the index, so the
    student's and the teacher's runs of one generation ask for the same digits."""
    labels = torch.randint(10, (GENERATION_BATCH,), generator=torch.Generator().manual_seed(10_000 + index))
    return pipe(labels.tolist(), **call)


def load_student(name: str) -> HistoryStudent:
    """The shipped student ``"ard"`` or ``"step"``."""
    if name not in STUDENTS:
        raise ValueError(f"student must be one of {sorted(STUDENTS)}, got {name!r}")
    return HistoryStudent.load(shipped_file(student_file(name), COMMAND.format(name=name)))


def plot_loss(student: HistoryStudent, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = torch.tensor(student.record["loss_curve"])
    window = max(1, len(curve) // 50)
    smooth = curve.unfold(0, window, window).mean(1) if len(curve) >= window else curve
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot((torch.arange(len(smooth)) + 0.5) * window, smooth, label=f"training (mean of {window} steps)")
    held = student.record["held_out_curve"]
    ax.plot([k for k, _ in held], [v for _, v in held], "o-", label="held-out trajectories")
    ax.set(xlabel="optimiser step", ylabel="velocity MSE", yscale="log",
           title=f"digits student, history in {student.layers} of 6 blocks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from .shipped import teacher_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", choices=sorted(STUDENTS),
                   help="the student to distil; without it, only record --trajectories")
    p.add_argument("--layers", type=int, default=None, help="history layers (default: the shipped student's)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of --minutes")
    p.add_argument("--trajectories", type=Path, default=None,
                   help="a trajectories file: used when it exists, else recorded and written there")
    p.add_argument("--generations", type=int, default=40, help=f"recorded generations of {GENERATION_BATCH}")
    p.add_argument("--points", choices=POINTS, default="denoised",
                   help="the student's intermediate points: the teacher's clean estimates (ARD's reference code) or "
                        "its latents (ditfx.history.record_trajectories)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.student is None and args.trajectories is None:
        p.error("give --student to distil one, or --trajectories FILE to record the trajectories only")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    pipe = teacher_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if args.trajectories is not None and args.trajectories.is_file():
        trajectories = Trajectories.load(args.trajectories)
        print(f"trajectories: {args.trajectories} ({len(trajectories)}, points "
              f"{trajectories.record.get('points', 'noisy')})", flush=True)
    else:
        trajectories = record_trajectories(pipe, trajectory_run, args.generations, steps=STEPS, seed=args.seed,
                                           points=args.points, **TEACHER)
        if args.trajectories is not None:
            trajectories.save(args.trajectories)
            print(f"wrote {args.trajectories} ({len(trajectories)} trajectories, "
                  f"{trajectories.record['seconds']:.0f} s)", flush=True)
    if args.student is None:
        return
    layers = STUDENTS[args.student] if args.layers is None else args.layers
    student = distill(pipe.transformer, trajectories, layers, minutes=None if args.steps else args.minutes,
                      steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    student.record["command"] = " ".join(["python -m ditfx.models.digits.students",
                                          *(sys.argv[1:] if argv is None else argv)])
    student.record["threads"] = torch.get_num_threads()
    name = f"student_{args.student}"
    path = student.save(args.out / f"{name}.safetensors")
    plot_loss(student, args.out / f"{name}_loss.png")
    print(json.dumps({k: v for k, v in student.record.items() if k not in ("loss_curve", "held_out_curve")},
                     indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {args.out / (name + '_loss.png')}")


if __name__ == "__main__":
    main()
