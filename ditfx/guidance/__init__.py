"""Guidance skipping (Adaptive Guidance, LinearAG, static windows): classifier-free guidance stops, per sample,
once it stops mattering; the unconditional rows are then not computed (docs/guidance.md).

* :mod:`ditfx.guidance.config`: the knobs, :class:`AdaptiveGuidance`, :class:`GuidanceWindow`, :class:`LinearAG`
  (and the calibration's own ``GuidanceRecording``);
* :mod:`ditfx.guidance.linear_ag`: :class:`LinearAGCoefficients`, the fitted estimate of unconditional predictions;
* :mod:`ditfx.guidance.variants`: the pass: Adaptive Guidance's cosine summed in the compiled epilogue;
* :mod:`ditfx.guidance.layout`: the CFG layout of a generation, from evidence (branch names, null class, data);
* :mod:`ditfx.guidance.policy`: the policies: which rows each call computes, and how the others are filled;
* :mod:`ditfx.guidance.calibration`: ``calibrate_guidance`` (LinearAG's coefficients) and ``guidance_trace``
  (``ditfx.calibrate_guidance``, ``ditfx.guidance_trace``), through ``ditfx.optimize`` like a user (above the api, so
  this package does not import it).
"""
from __future__ import annotations

import ditfx.guidance.policy  # noqa: F401  (registers the policies of its configs)
from ditfx.guidance import variants
from ditfx.guidance.config import AdaptiveGuidance, GuidanceRecording, GuidanceWindow, LinearAG
from ditfx.guidance.linear_ag import LinearAGCoefficients
from ditfx.technique import Technique

TECHNIQUE = Technique(
    name="guidance", configs=(AdaptiveGuidance, LinearAG, GuidanceWindow), internal=(GuidanceRecording,),
    offer=variants.offer, order=2, example="ditfx.AdaptiveGuidance()",
    options={"adaptive": AdaptiveGuidance, "window": GuidanceWindow, "linear": LinearAG},
    option_examples={"adaptive": "{'kind': 'adaptive', 'gamma': 0.99}",
                     "window": "{'kind': 'window', 'start': 0.0, 'stop': 0.5}",
                     "linear": "{'kind': 'linear', 'coefficients': 'linear_ag.json'}"},
)

__all__ = ["TECHNIQUE", "AdaptiveGuidance", "GuidanceRecording", "GuidanceWindow", "LinearAG",
           "LinearAGCoefficients"]
