"""DigitsPipeline: class-conditional sampling from the digits DiT, as diffusers' pipelines do it."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .model import NULL_CLASS, check_class_labels

SCHEDULERS = ("euler", "dpm")


def make_scheduler(name: str = "euler"):
    """The default flow-matching Euler scheduler, or DPM-Solver++ (2nd order) for flow matching."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler()
    if name == "dpm":
        # Flow sigmas sigma = 1 - alpha and a velocity ("flow") output match the training objective;
        # flow_shift 1.0 keeps the unshifted schedule the model was trained with.
        return DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0
        )
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 16x16 digit generation with batched classifier-free guidance.

    Args:
        transformer: the digits ``DiTTransformer2DModel`` (velocity prediction, null class 10).
        scheduler: ``FlowMatchEulerDiscreteScheduler`` or a flow-matching
            ``DPMSolverMultistepScheduler``.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self._current_timestep = None

    @property
    def current_timestep(self):
        """The timestep of the step being denoised (None outside a call), as diffusers' pipelines expose it
        for cache hooks' ``current_timestep_callback``."""
        return self._current_timestep

    def _cache_context(self, name: str, **kwargs):
        """``transformer.cache_context(name, ...)`` where the transformer has one (diffusers' ``CacheMixin``):
        diffusers' cache hooks keep their state per named context, which diffusers' pipelines set around every
        transformer call."""
        cache_context = getattr(self.transformer, "cache_context", None)
        return cache_context(name, **kwargs) if callable(cache_context) else contextlib.nullcontext()

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,  # chosen from a measured sweep: docs/digits.md, "The default guidance scale"
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        sigmas: list[float] | None = None,
        callback_on_step_end=None,
    ):
        """Sample one digit per entry of ``class_labels`` (ints 0..9; 10 samples unconditionally).

        guidance_scale (default 1.5: the lowest digits-FD at >= 99 % class accuracy, docs/digits.md)
        > 1 runs the unconditional and conditional halves as one batch of 2N and
        combines them as ``uncond + guidance_scale * (cond - uncond)``; <= 1 runs the conditional
        model alone on a batch of N. output_type "pt" gives a (N, 1, 16, 16) tensor in [-1, 1],
        "np" the same as a numpy array, "pil" a list of 16x16 grayscale PIL images.
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self._execution_device
        class_labels = torch.as_tensor(class_labels)
        if class_labels.ndim == 0:
            class_labels = class_labels[None]
        check_class_labels(class_labels)
        class_labels = class_labels.to(device=device, dtype=torch.int64)
        batch_size = len(class_labels)
        do_classifier_free_guidance = guidance_scale > 1.0

        config = self.transformer.config
        latents = randn_tensor(
            (batch_size, config.in_channels, config.sample_size, config.sample_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        # No init_noise_sigma scaling: in flow matching the first step sees pure N(0, I) noise
        # (sigma=1), as in diffusers' flow-matching pipelines (the Euler scheduler has no such
        # attribute).

        if do_classifier_free_guidance:
            null_labels = torch.full_like(class_labels, NULL_CLASS)
            class_labels_input = torch.cat([null_labels, class_labels])  # unconditional half first
        else:
            class_labels_input = class_labels

        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=list(sigmas), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            self._current_timestep = t
            latent_model_input = (
                torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            )
            timestep = t.expand(latent_model_input.shape[0])
            # One batched call per step: both CFG halves share the context "cond_uncond".
            context = {"step_index": i, "num_inference_steps": len(self.scheduler.timesteps), "timestep": t}
            if getattr(self.scheduler, "sigmas", None) is not None:
                context["sigma"] = float(self.scheduler.sigmas[i])
            with self._cache_context(
                "cond_uncond" if do_classifier_free_guidance else "cond", **context
            ):
                noise_pred = self.transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    class_labels=class_labels_input,
                    return_dict=False,
                )[0]
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (
                    noise_pred_cond - noise_pred_uncond
                )
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            # The schedulers upcast to float32 internally; keep the model's dtype for the next call.
            latents = latents.to(self.transformer.dtype)
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        self._current_timestep = None
        images = latents.float().clamp(-1.0, 1.0)
        self.maybe_free_model_hooks()
        if output_type == "np":
            images = images.cpu().numpy()
        elif output_type == "pil":
            pixels = ((images[:, 0] + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
            images = [
                Image.fromarray(np.ascontiguousarray(p)) for p in pixels
            ]  # uint8 HxW: mode "L"
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class DigitsStudentPipeline(DigitsPipeline):
    """A distilled few-step student of the digits pipeline (``ditfx.models.digits.pipeline(student=...)``): it
    samples in its own steps at the noise levels it was distilled for (``sigmas``), without classifier-free
    guidance, which the teacher's guided trajectories have distilled into it."""

    def __init__(self, transformer: DiTTransformer2DModel, scheduler, sigmas: list[float] | None = None):
        super().__init__(transformer=transformer, scheduler=scheduler)
        self.student_sigmas = [float(s) for s in sigmas or ()]

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 generator=None, output_type: str = "pt", return_dict: bool = True, callback_on_step_end=None):
        """Sample one digit per entry of ``class_labels`` in the student's steps (see DigitsPipeline)."""
        steps = len(self.student_sigmas)
        if not steps:
            raise ValueError("this student pipeline has no sigmas: build it with "
                             "ditfx.models.digits.pipeline(student='ard' | 'step')")
        if num_inference_steps is not None and num_inference_steps != steps:
            raise ValueError(f"this student was distilled for {steps} steps at sigmas {self.student_sigmas}; "
                             f"num_inference_steps={num_inference_steps} is not supported (leave it out)")
        if guidance_scale != 1.0:
            raise ValueError("the student has the teacher's classifier-free guidance distilled into it and samples "
                             f"without it: guidance_scale must be 1.0, got {guidance_scale}")
        return super().__call__(class_labels, guidance_scale=1.0, generator=generator, output_type=output_type,
                                return_dict=return_dict, sigmas=self.student_sigmas,
                                callback_on_step_end=callback_on_step_end)
