"""Tiny diffusers pipelines from random components, for end-to-end tests of ``ditfx.optimize(pipe, ...)``.

``build(name, seed)`` returns ``(pipe, call_kwargs)``: a pipeline whose transformer is a random few-block model
(the ``tiny:<family>`` configs of :mod:`ditfx.models.zoo` where they fit), with no text encoder or tokenizer
(the prompt embeddings are random tensors in ``call_kwargs``), no VAE where the pipeline can return latents
(``output_type="latent"``; a one-level random ``AutoencoderKL`` for DiTPipeline, which always decodes),
classifier-free guidance on, a few steps at 8 x 8 latents. ``run(pipe, call_kwargs, seed)`` performs one
generation and returns its output tensor. Nothing downloads; a generation takes well under a second on a CPU.

``LAYOUTS`` records how each pipeline calls its transformer with guidance on (batched or two calls, which branch
first, cache contexts, hook resets), as :func:`observe` reads it off a generation; ``NAMES`` lists the pipelines.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ditfx.models import zoo

STEPS = 3  # denoising steps per generation


def _randn(g: torch.Generator):
    def r(*shape):
        return torch.randn(*shape, generator=g)

    return r


def _tiny(family: str, seed: int) -> torch.nn.Module:
    """The zoo's tiny transformer of ``family``, random weights (its example inputs are not used)."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    model, _, _ = zoo._TINY[family](_randn(g), torch.full((1,), 700.0), 1)
    return zoo.randomize(model, seed)


def _embeds(r, length: int, dim: int, mask: str | None = None, dtype=torch.long) -> dict:
    """Random prompt and negative-prompt embeddings (one prompt), and their all-ones attention masks if ``mask``
    names the mask argument (``"prompt_attention_mask"``: the negative one is ``negative_<mask>``)."""
    kw = {"prompt_embeds": r(1, length, dim), "negative_prompt_embeds": r(1, length, dim)}
    if mask is not None:
        kw[mask] = torch.ones(1, length, dtype=dtype)
        kw[f"negative_{mask}"] = torch.ones(1, length, dtype=dtype)
    return kw


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _tiny_vae(seed: int):
    """A one-level AutoencoderKL (4 latent channels, no up/down-sampling): what DiTPipeline decodes with."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    return vae.eval()


# ---- builders: (seed, r) -> (pipe, call_kwargs) --------------------------------------------------------------


def _dit(seed, r):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    # 1000 classes: the pipeline's null class is the literal 1000 (the table's extra, CFG-dropout row)
    torch.manual_seed(seed)
    transformer = zoo.randomize(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000), seed)
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(seed), scheduler=DDIMScheduler(clip_sample=False),
                       id2label=None)
    # DiTPipeline always decodes; "pt" returns the decoded image tensor
    return pipe, dict(class_labels=[3, 7], guidance_scale=4.0, output_type="pt")


def _pixart(sigma: bool):
    def build(seed, r):
        from diffusers import (
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
            PixArtAlphaPipeline,
            PixArtSigmaPipeline,
        )

        # v-prediction: an epsilon-predicting random model's x0 estimates at high noise reach hundreds
        cls, scheduler = ((PixArtSigmaPipeline, EulerDiscreteScheduler) if sigma
                          else (PixArtAlphaPipeline, DPMSolverMultistepScheduler))
        pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=_tiny("pixart", seed),
                   scheduler=scheduler(prediction_type="v_prediction"))
        kw = _embeds(r, 5, 12, mask="prompt_attention_mask")
        return pipe, dict(kw, negative_prompt=None, height=64, width=64, use_resolution_binning=False,
                          guidance_scale=4.5)

    return build


def _sd3(seed, r):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=_tiny("sd3", seed), scheduler=_flow_scheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    kw = dict(_embeds(r, 5, 12), pooled_prompt_embeds=r(1, 10), negative_pooled_prompt_embeds=r(1, 10))
    return pipe, dict(kw, height=64, width=64, guidance_scale=5.0)


def _flux(seed, r):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=_tiny("flux", seed))
    kw = dict(_embeds(r, 5, 12), pooled_prompt_embeds=r(1, 10), negative_pooled_prompt_embeds=r(1, 10))
    return pipe, dict(kw, height=64, width=64, true_cfg_scale=3.0)


def _wan(seed, r):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_scheduler(shift=3.0),
                       transformer=_tiny("wan", seed))
    # 5 frames -> 2 latent frames of 8 x 8
    return pipe, dict(_embeds(r, 5, 12), height=64, width=64, num_frames=5, guidance_scale=5.0)


def _sana(seed, r):
    from diffusers import SanaPipeline

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_tiny("sana", seed),
                        scheduler=_flow_scheduler(shift=3.0))
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask")
    # without a VAE the pipeline assumes DC-AE's 32x compression: 256 px -> 8 x 8 latents
    return pipe, dict(kw, negative_prompt=None, height=256, width=256, use_resolution_binning=False,
                      guidance_scale=4.5)


def _auraflow(seed, r):
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_tiny("auraflow", seed),
                            scheduler=_flow_scheduler())
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask")
    return pipe, dict(kw, height=64, width=64, guidance_scale=3.5)


def _cogview4(seed, r):
    from diffusers import CogView4Pipeline

    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_tiny("cogview4", seed),
                            scheduler=_flow_scheduler())
    return pipe, dict(_embeds(r, 5, 12), height=64, width=64, guidance_scale=5.0)


def _qwenimage(seed, r):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=_tiny("qwenimage", seed))
    kw = _embeds(r, 5, 12)
    kw.update(prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
              negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long))
    return pipe, dict(kw, height=64, width=64, true_cfg_scale=4.0)


def _lumina2(seed, r):
    from diffusers import Lumina2Pipeline

    pipe = Lumina2Pipeline(transformer=_tiny("lumina2", seed), scheduler=_flow_scheduler(), vae=None,
                           text_encoder=None, tokenizer=None)
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask")
    return pipe, dict(kw, height=64, width=64, guidance_scale=4.0)


def _hunyuan(seed, r):
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    scheduler = DDPMScheduler(clip_sample=False, prediction_type="v_prediction")
    pipe = HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=_tiny("hunyuan", seed),
                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask")  # BERT embeddings; mT5 ones (_2) below
    kw.update(prompt_embeds_2=r(1, 6, 16), negative_prompt_embeds_2=r(1, 6, 16),
              prompt_attention_mask_2=torch.ones(1, 6, dtype=torch.long),
              negative_prompt_attention_mask_2=torch.ones(1, 6, dtype=torch.long))
    return pipe, dict(kw, height=64, width=64, use_resolution_binning=False, guidance_scale=5.0,
                      original_size=(64, 64), target_size=(64, 64))


def _ltx(seed, r):
    from diffusers import LTXPipeline

    pipe = LTXPipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=_tiny("ltx", seed))
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask")
    # without a VAE: 32x spatial, 8x temporal compression: 128 px, 9 frames -> 2 x 4 x 4 latents
    return pipe, dict(kw, height=128, width=128, num_frames=9, guidance_scale=3.0)


def _chroma(seed, r):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=_tiny("chroma", seed))
    kw = _embeds(r, 5, 12, mask="prompt_attention_mask", dtype=torch.bool)  # the mask reaches SDPA as it is
    return pipe, dict(kw, height=64, width=64, guidance_scale=5.0)


# ---- how each pipeline calls its transformer --------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a pipeline calls its transformer with classifier-free guidance on (observed by :func:`observe`).

    ``batched``: one call of 2B rows per step (else two calls of B rows). ``uncond_first``: batched, the
    unconditional half is rows [:B]; two calls, the unconditional call comes first. ``contexts``: the names of
    ``transformer.cache_context(name)`` around a step's calls, in call order (``()``: none). ``frees_hooks``:
    ``__call__`` ends with ``maybe_free_model_hooks()``; ``resets_hooks``: that resets the transformer's stateful
    diffusers hooks (``_reset_stateful_cache``, only on models with diffusers' CacheMixin). ``null_class``: the
    class label of the unconditional rows (DiTPipeline). ``time_scale``: the timestep at noise level 1 (1000, or
    1 for sigmas); ``reversed_time``: the timestep is 1 - sigma (0 is noise, Lumina2).
    """

    batched: bool
    uncond_first: bool
    contexts: tuple[str, ...]
    frees_hooks: bool
    resets_hooks: bool
    time_scale: float
    null_class: int | None = None
    reversed_time: bool = False


def _two_calls(**kw) -> Layout:
    return Layout(**{"batched": False, "uncond_first": False, "contexts": ("cond", "uncond"), "frees_hooks": True,
                     "resets_hooks": True, "time_scale": 1.0, **kw})


def _batched(**kw) -> Layout:
    return Layout(**{"batched": True, "uncond_first": True, "contexts": (), "frees_hooks": True,
                     "resets_hooks": False, "time_scale": 1000.0, **kw})


# Observed with diffusers 0.42.1 (tests/test_pipelines.py checks these against observe()). Every pipeline ends
# __call__ with maybe_free_model_hooks(); it reaches the transformer's stateful hooks only where the model has
# diffusers' CacheMixin (Flux, Wan, CogView4, Qwen-Image, LTX, Chroma).
LAYOUTS: dict[str, Layout] = {
    # batched [cond | null class]: the conditional half first, the null class is 1000 (= num_classes)
    "dit": _batched(uncond_first=False, null_class=1000),
    "pixart_alpha": _batched(),
    "pixart_sigma": _batched(),
    "sd3": _batched(),
    # true CFG (true_cfg_scale > 1): two calls, conditional first, each in cache_context("cond"/"uncond")
    "flux": _two_calls(),
    "wan": _two_calls(time_scale=1000.0),
    "sana": _batched(),
    "auraflow": _batched(time_scale=1.0),
    "cogview4": _two_calls(time_scale=1000.0),
    "qwenimage": _two_calls(),
    # two calls, conditional first, no cache_context, not a CacheMixin; the timestep runs 0 (noise) -> 1
    "lumina2": _two_calls(contexts=(), resets_hooks=False, reversed_time=True),
    "hunyuandit": _batched(),
    # batched in one cache_context("cond_uncond")
    "ltx": _batched(contexts=("cond_uncond",), resets_hooks=True),
    # two calls, conditional first, no cache_context (but a CacheMixin: its hooks are reset)
    "chroma": _two_calls(contexts=()),
}


def observe(pipe, kwargs: dict, seed: int = 0) -> Layout:
    """Run one generation of an un-optimized pipeline and read its :class:`Layout` off its transformer calls.

    A forward pre-hook records each call's rows, timestep and which rows are conditional (the conditioning input
    compared with ``prompt_embeds`` / ``negative_prompt_embeds``, or DiTPipeline's class labels); a stateful
    diffusers hook (a ``StateManager`` attribute, as the cache hooks have) records the cache context of each call
    and whether the pipeline resets it.
    """
    from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

    class _State(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class _Probe(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state = StateManager(_State)
            self.resets = 0

        def reset_state(self, module):
            self.resets += 1
            return module

    transformer = pipe.transformer
    probe = _Probe()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(probe, "ditfx_tests_probe")
    calls = []  # (rows, timestep, per-row "c"/"u", context name)
    cond, uncond = kwargs.get("prompt_embeds"), kwargs.get("negative_prompt_embeds")
    labels = kwargs.get("class_labels")

    nulls = set()  # class labels of the unconditional rows

    def branch(row: torch.Tensor) -> str:
        if labels is not None:
            if int(row) in labels:
                return "c"
            nulls.add(int(row))
            return "u"
        for tag, ref in (("c", cond), ("u", uncond)):
            if row.shape == ref.shape[1:] and torch.equal(row, ref[0]):
                return tag
        return "?"

    def pre(module, args, kw):
        x = kw["hidden_states"] if "hidden_states" in kw else args[0]
        t = kw["timestep"] if "timestep" in kw else args[1]  # HunyuanDiT passes both positionally
        rows = kw["class_labels"] if labels is not None else kw["encoder_hidden_states"]
        context = probe.state._context
        calls.append((x.shape[0], float(t.flatten()[0]), "".join(branch(r) for r in rows),
                      None if context is None else context.name))

    freed = []
    handle = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    pipe.maybe_free_model_hooks = lambda: (freed.append(True), type(pipe).maybe_free_model_hooks(pipe))
    try:
        out = run(pipe, kwargs, seed)
    finally:
        handle.remove()
        HookRegistry.check_if_exists_or_initialize(transformer).remove_hook("ditfx_tests_probe")
        del pipe.maybe_free_model_hooks
    samples = out.shape[0]
    steps = len({t for _, t, _, _ in calls})
    per_step = len(calls) // steps
    step = calls[:per_step]
    if per_step == 1:
        (rows, _, branches, _), = step
        assert rows == 2 * samples and sorted(branches) == ["c"] * samples + ["u"] * samples, step
        uncond_first = branches.startswith("u")
    else:
        assert per_step == 2 and [r for r, _, _, _ in step] == [samples] * 2, step
        uncond_first = step[0][2] == "u" * samples
    times = [t for _, t, _, _ in calls]
    scale = 1000.0 if max(times) > 1.5 else 1.0
    assert len(nulls) <= 1, nulls
    return Layout(batched=per_step == 1, uncond_first=uncond_first,
                  contexts=tuple(c for _, _, _, c in step if c is not None), frees_hooks=bool(freed),
                  resets_hooks=probe.resets > 0, time_scale=scale, null_class=nulls.pop() if nulls else None,
                  reversed_time=times[0] < times[-1])


_BUILDERS: dict[str, Callable] = {
    "dit": _dit, "pixart_alpha": _pixart(False), "pixart_sigma": _pixart(True), "sd3": _sd3, "flux": _flux,
    "wan": _wan, "sana": _sana, "auraflow": _auraflow, "cogview4": _cogview4, "qwenimage": _qwenimage,
    "lumina2": _lumina2, "hunyuandit": _hunyuan, "ltx": _ltx, "chroma": _chroma,
}
NAMES = tuple(_BUILDERS)


def build(name: str, seed: int = 0):
    """``(pipe, call_kwargs)`` for the tiny pipeline ``name``: ``pipe(**call_kwargs, generator=g)`` generates."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown pipeline {name!r}: use one of {', '.join(NAMES)}")
    g = torch.Generator().manual_seed(seed + 2)
    pipe, kw = _BUILDERS[name](seed, _randn(g))
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": STEPS, "output_type": "latent", **kw}
    return pipe, kw


@torch.no_grad()
def run(pipe, kwargs: dict, seed: int = 0) -> torch.Tensor:
    """One generation at ``seed``; its output tensor (latents, or DiTPipeline's decoded image)."""
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    out = out[0] if isinstance(out, tuple) else out.to_tuple()[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(pipe).__name__} returned {type(out).__name__}, not a tensor")
    return out
