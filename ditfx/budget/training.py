"""Weak-mode distillation: train a model's coarse-patch mode on its own native predictions. No dataset.

1. **Record.** The caller's ``run(pipe)`` drives the pipeline as it will be used (prompts or labels, guidance,
   step count); a forward hook on the denoiser records each call's inputs and the native prediction, for the
   calls in the weak range (normalised time ``t / time_scale > 1 - weak_until``), where the weak mode will run.
2. **Capture.** The denoiser is captured by Dynamo once; its graph is rewritten to the weak patch size
   (:mod:`ditfx.budget.weak`) with LoRA on the blocks' stream linears, the weak tensors initialised by
   PI-resize (the zero-shot mode) and the LoRA up-projections at zero, so training starts at the zero-shot mode.
3. **Train.** Adam on the adapter's tensors only (the model's weights are frozen and the native mode never
   changes), minimising the mean squared error between the weak prediction and the recorded native one, for
   ``minutes`` of wall time or ``steps`` steps. A held-out generation measures the zero-shot and the trained
   gap.

The result is a :class:`~ditfx.budget.adapter.BudgetAdapter` whose record holds the loss curve; ``save`` writes it
(safetensors), :func:`plot_loss` the curve (PNG).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.fx as fx

from ditfx.budget.adapter import BudgetAdapter
from ditfx.budget.weak import WeakGraph, weak_graph, zero_shot_tensors
from ditfx.graph.capture import capture
from ditfx.graph.cost import graph_flops
from ditfx.graph.sites import find_sites
from ditfx.graph.structure import analyse
from ditfx.recording import Recorded, first_tensor, record_calls


class WeakRunner:
    """A torch.compile backend that runs the weak graph of whatever Dynamo captures, with the adapter's tensors
    appended: calling the compiled denoiser then runs the weak mode. Without ``adapter`` the tensors start at the
    zero-shot mode (LoRA up-projections at zero) as trainable leaves, so it also trains with autograd."""

    def __init__(self, patch: int, lora_rank: int, resize: str, adapter: BudgetAdapter | None = None):
        self.patch, self.lora_rank, self.resize = patch, lora_rank, resize
        self.params: dict[str, torch.Tensor] = {}
        self.weak: WeakGraph | None = None
        self.sites = None
        self.native_flops = self.weak_flops = 0
        if adapter is not None:
            self.patch, self.lora_rank = adapter.patch, adapter.lora_rank
            self.params = dict(adapter.tensors)
            self._adapter = adapter

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        structure = analyse(gm)
        sites = find_sites(gm, structure.roles, example_inputs)
        weak = weak_graph(gm, sites, self.patch, self.lora_rank)
        if self.sites is None:  # the weak cost as the budget runs it: LoRA merged into the weights
            self.native_flops = int(graph_flops(list(gm.graph.nodes)))
            plain = weak if not self.lora_rank else weak_graph(gm, sites, self.patch)
            self.weak_flops = int(graph_flops(list(plain.gm.graph.nodes)))
        if self.params and self.sites is None:
            self._adapter.check(weak.shapes)
            self.sites, self.weak = sites, weak
        if not self.params:
            self.sites, self.weak = sites, weak
            init = zero_shot_tensors(gm, sites, example_inputs, self.patch, self.resize)
            gen = torch.Generator().manual_seed(0)
            for key in weak.keys:
                if key in init:
                    value = init[key].clone()
                elif key.endswith(".down"):  # LoRA: random down, zero up, so the update starts at zero
                    shape = weak.shapes[key]
                    value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
                else:
                    value = torch.zeros(weak.shapes[key])
                ref = init["embed.weight"]
                self.params[key] = value.to(device=ref.device, dtype=torch.float32).requires_grad_(True)
        params = [self.params[k] for k in weak.keys]
        run = weak.gm

        def forward(*args):
            return run(*args, *[p.to(args[0].dtype) if isinstance(args[0], torch.Tensor) else p for p in params])

        return forward


def distill(pipe, run: Callable[[object], object] | None = None, patch_size: int | None = None, minutes: float = 20.0,
            steps: int | None = None, lora_rank: int = 4, weak_until: float = 0.75, time_scale: float = 1000.0,
            lr: float = 1e-3, generations: int = 4, resize: str = "bilinear", seed: int = 0,
            progress: Callable[[str], None] | None = print) -> BudgetAdapter:
    """Distil the weak mode of ``pipe``'s denoiser (``pipe.transformer``, or a bare model with ``run``) at
    ``patch_size`` (default twice the native) from its own native predictions.

    ``run(pipe)`` drives one generation (a new seed each time); ``generations`` of them are recorded for
    training and one more is held out. ``weak_until``: the fraction of normalised time the adapter is trained for
    (train for at least the range the budget will run weak). ``time_scale``: the timestep at noise level 1.
    Trains for ``minutes`` of wall time, or ``steps`` steps when given.
    """
    if run is None:
        raise ValueError("ditfx.budget.distill needs run(pipe): a callable that runs one generation of the pipeline "
                         "as it will be used (for the digits model, ditfx.models.digits.budget_run)")
    denoiser = getattr(pipe, "transformer", pipe)
    if not isinstance(denoiser, torch.nn.Module):
        raise TypeError(f"ditfx.budget.distill takes a pipeline with a .transformer or a torch.nn.Module, got "
                        f"{type(pipe).__name__}")
    if hasattr(denoiser, "_orig_mod") or getattr(denoiser, "_compiled_call_impl", None) is not None:
        raise ValueError("ditfx.budget.distill takes the pipeline before ditfx.optimize/torch.compile: pass the "
                         "original")
    if not 0 < weak_until <= 1:
        raise ValueError(f"weak_until is a fraction of normalised time in (0, 1], got {weak_until}")
    say = progress or (lambda _msg: None)
    torch.manual_seed(seed)
    records: list[list[Recorded]] = []
    for g in range(generations + 1):
        torch.manual_seed(seed + 1000 * g)
        records.append(record_calls(denoiser, lambda: run(pipe), time_scale, weak_until))
        say(f"budget distill: recorded generation {g + 1}/{generations + 1} ({len(records[-1])} calls in the weak "
            "range)")
    train, held_out = [c for r in records[:-1] for c in r], records[-1]
    if not train or not held_out:
        raise ValueError(f"no denoiser calls fell in the weak range (t / {time_scale} > {1 - weak_until:.3f}): check "
                         "time_scale (the timestep at noise level 1) and that run(pipe) calls the denoiser")
    trainer = WeakRunner(0, lora_rank, resize)
    frozen = [p for p in denoiser.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        torch._dynamo.reset()
        weak_model = torch.compile(denoiser, backend=trainer, dynamic=False)
        trainer.patch = patch_size or 0
        if trainer.patch == 0:  # twice the native patch: read it from a capture
            sites = capture_sites(denoiser, train[0])
            trainer.patch = 2 * sites.patch
        first = train[0]
        with torch.no_grad():
            weak_model(*first.args, **first.kwargs)
        params = list(trainer.params.values())
        optim = torch.optim.Adam(params, lr=lr)

        def loss_on(call: Recorded) -> torch.Tensor:
            pred = first_tensor(weak_model(*call.args, **call.kwargs))
            return torch.nn.functional.mse_loss(pred.float(), call.target.float())

        def evaluate() -> float:
            with torch.no_grad():
                return sum(float(loss_on(c)) for c in held_out) / len(held_out)

        zero_shot = evaluate()
        say(f"budget distill: patch {trainer.sites.patch} -> {trainer.patch}, {len(params)} adapter tensors, "
            f"held-out loss zero-shot {zero_shot:.5f}")
        curve: list[tuple[int, float]] = []
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        step, running = 0, None
        while (steps is not None and step < steps) or (steps is None and time.perf_counter() - start < 60 * minutes):
            call = train[int(torch.randint(len(train), (1,), generator=gen))]
            done = step / steps if steps is not None else (time.perf_counter() - start) / (60 * minutes)
            for group in optim.param_groups:  # cosine decay to a tenth over the run
                group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))
            loss = loss_on(call)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            step += 1
            if step % 50 == 0:
                curve.append((step, running))
            if step % 500 == 0:
                say(f"budget distill: step {step}, loss {running:.5f}, {time.perf_counter() - start:.0f} s")
        trained = evaluate()
        seconds = time.perf_counter() - start
    finally:
        for p in frozen:
            p.requires_grad_(True)
        torch._dynamo.reset()
    say(f"budget distill: {step} steps in {seconds:.0f} s; held-out loss {zero_shot:.5f} (zero-shot) -> "
        f"{trained:.5f}")
    sites = trainer.sites
    return BudgetAdapter(
        patch=trainer.patch, native_patch=sites.patch, lora_rank=lora_rank, time_scale=time_scale,
        tensors={k: v.detach().clone() for k, v in trainer.params.items()},
        model={"class": type(denoiser).__name__, "grid": list(sites.grid), "width": sites.width,
               "in_channels": sites.in_channels, "out_channels": sites.out_channels},
        record={"steps": step, "seconds": round(seconds, 1), "lr": lr, "weak_until": weak_until,
                "generations": generations, "train_calls": len(train), "held_out_calls": len(held_out),
                "held_out_loss_zero_shot": zero_shot, "held_out_loss": trained, "loss_curve": curve,
                "seed": seed, "resize": resize})


def capture_sites(denoiser: torch.nn.Module, call: Recorded):
    """The patch-size sites of ``denoiser``'s graph, captured on one recorded call."""
    gm, example_inputs = capture(denoiser, *call.args, **call.kwargs)
    return find_sites(gm, analyse(gm).roles, example_inputs)


def zero_shot(pipe, example: Callable[[object], object], patch_size: int | None = None,
              resize: str = "bilinear", time_scale: float = 1000.0) -> BudgetAdapter:
    """The zero-shot adapter (PI-resize only, no training) of ``pipe``'s denoiser, from one call ``example(pipe)``
    makes (its shapes fix the grid)."""
    denoiser = getattr(pipe, "transformer", pipe)
    calls = record_calls(denoiser, lambda: example(pipe), time_scale, 1.0)
    if not calls:
        raise ValueError("example(pipe) made no denoiser call")
    gm, example_inputs = capture(denoiser, *calls[0].args, **calls[0].kwargs)
    sites = find_sites(gm, analyse(gm).roles, example_inputs)
    patch = patch_size or 2 * sites.patch
    return BudgetAdapter(
        patch=patch, native_patch=sites.patch, tensors=zero_shot_tensors(gm, sites, example_inputs, patch, resize),
        time_scale=time_scale, record={"zero_shot": True, "resize": resize},
        model={"class": type(denoiser).__name__, "grid": list(sites.grid), "width": sites.width})


def plot_loss(adapter: BudgetAdapter, path) -> None:
    """The adapter's training loss curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = adapter.record.get("loss_curve") or []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if curve:
        ax.plot([s for s, _ in curve], [v for _, v in curve], label="training (EMA)")
    for key, style, label in (("held_out_loss_zero_shot", "--", "held-out, zero-shot"),
                              ("held_out_loss", ":", "held-out, trained")):
        if key in adapter.record:
            ax.axhline(adapter.record[key], linestyle=style, color="gray" if "zero" in key else "k", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the native prediction")
    ax.set_title(f"weak mode p{adapter.native_patch} -> p{adapter.patch} distillation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
