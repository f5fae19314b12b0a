"""Block caching ("Cache Me if You Can", and the dynamic first-block-cache rule the peers use): a block whose
residual barely changes between steps is not run; its cached residual is added instead (docs/block_cache.md).

* :mod:`ditfx.cache.config`: the knobs, :class:`DynamicCache`, :class:`StaticCache` (and the calibration's own
  ``CacheCalibration``), and their check against a model;
* :mod:`ditfx.cache.schedule`: :class:`CacheSchedule`, the fitted per-block change curves a static cache runs;
* :mod:`ditfx.cache.change`: the relative-L1 change rule (shared with the ``cache_residual`` kernel);
* :mod:`ditfx.cache.variants`: the pass: each block's variants that also return what is cached (and the probe's
  change sums);
* :mod:`ditfx.cache.policy`: the policies that decide, per step and block, to run or reuse;
* :mod:`ditfx.cache.calibration`: ``calibrate`` (``ditfx.calibrate``), which records a schedule through
  ``ditfx.optimize`` like a user (it sits above the api, so this package does not import it).
"""
from __future__ import annotations

import ditfx.cache.policy  # noqa: F401  (registers the policies of its configs)
from ditfx.cache import config, variants
from ditfx.cache.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.cache.schedule import CacheSchedule
from ditfx.technique import Technique

TECHNIQUE = Technique(
    name="cache", configs=(DynamicCache, StaticCache), internal=(CacheCalibration,), offer=variants.offer,
    order=3, example="ditfx.DynamicCache(threshold=0.1)", check_model=config.check_model,
    options={"dynamic": DynamicCache, "static": StaticCache},
    option_examples={"dynamic": "{'kind': 'dynamic', 'threshold': 0.1}",
                     "static": "{'kind': 'static', 'delta': 0.1, 'schedule': 'schedule.json'}"},
)


__all__ = ["TECHNIQUE", "CacheCalibration", "CacheSchedule", "DynamicCache", "StaticCache"]
