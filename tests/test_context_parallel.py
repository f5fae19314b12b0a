"""ditfx under diffusers' context parallelism, two gloo processes with Ulysses attention: every rank decides from
the whole sequence's sums, so every rank ends with the single-process result and counts."""
import pytest
import torch
from context_parallel import generate, run_parallel

import ditfx

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.timeout(600)]


@pytest.mark.parametrize("family, config, guidance", [
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0), compiler="eager"), None),
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), compiler="eager"), None),
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), guidance=ditfx.AdaptiveGuidance(0.9),
                          compiler="eager"), "two"),
    # QwenImage splits its sequence in block 0's pre-forward hook: the split moves to the prologue
    ("qwenimage", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), compiler="eager"), None),
])
def test_every_rank_decides_what_one_process_decides(family, config, guidance, tmp_path):
    ranks = run_parallel(tmp_path, family, config, guidance)
    one, stats = generate(family, config, parallel=False, guidance=guidance)
    scale = float(one.abs().max())
    for rank in ranks:
        assert rank["stats"] == stats, (rank["stats"], stats)
        assert (rank["out"] - one).abs().max() <= 1e-4 * scale
    assert torch.equal(ranks[0]["out"], ranks[1]["out"])
    if config.cache.threshold > 0:
        assert stats["skipped"] > 0
