"""ditfx under diffusers' context parallelism, two gloo processes with Ulysses attention: every rank decides from
the whole sequence's sums, so every rank ends with the single-process result and counts."""
import pytest
import torch
from parallel_ranks import generate, run_parallel

import ditfx

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.timeout(600)]


@pytest.mark.parametrize("family, config, guidance", [
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0), compiler="eager"), None),
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), compiler="eager"), None),
    ("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), guidance=ditfx.AdaptiveGuidance(0.9),
                          compiler="eager"), "two"),
    # QwenImage splits its sequence in block 0's pre-forward hook: the split moves to the prologue
    ("qwenimage", ditfx.Config(cache=ditfx.DynamicCache(threshold=0.3), guidance=ditfx.AdaptiveGuidance(0.9),
                               compiler="eager"), "two"),
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


class _Mesh:
    """A two-rank mesh as diffusers' context-parallel config holds it (no process group is used before the
    refusals)."""

    def size(self):
        return 2

    def get_group(self):
        return None


def _as_context_parallel(model):
    from types import SimpleNamespace

    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(_flattened_mesh=_Mesh()))
    return model


def test_what_does_not_run_under_context_parallelism_is_refused_by_name(tmp_path):
    from ditfx.models import zoo

    named = zoo.load("DiT-T/2")
    model = _as_context_parallel(named.model)
    with pytest.raises(ValueError, match="context parallelism enabled"):
        ditfx.export(model, tmp_path / "p", example_inputs=named.inputs)
    assert not (tmp_path / "p").exists()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, steps=4)))
    with pytest.raises(RuntimeError, match="HistoryAttention does not run under context parallelism"):
        with ditfx.generation(fast), torch.no_grad():
            fast(**named.inputs)
