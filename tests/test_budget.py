"""Token budgets (FlexiDiT): the weak mode built from the captured graph, the schedule, exactness at the full
budget, the native mode untouched by an adapter, FLOPs, compile hygiene and state across a mode switch."""
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditfx
from conftest import cfg_loop, tiny_model
from ditfx.budget import BudgetAdapter, BudgetSchedule
from ditfx.budget.adapter import AdapterError
from ditfx.budget.schedule import weak_steps_for
from ditfx.budget.variants import mode_key
from ditfx.budget.weak import BudgetConversionError, weak_graph, zero_shot_tensors
from ditfx.graph.capture import capture as capture_graph
from ditfx.graph.sites import SiteError, find_sites
from ditfx.graph.structure import analyse
from ditfx.models import zoo
from ditfx.models.dit import build_dit

TOL = 1e-5
CONVERTED = ("DiT-T/2", "tiny:dit", "tiny:pixart", "tiny:sd3", "tiny:sana", "tiny:flux", "tiny:chroma")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def budget(named, **kw):
    return ditfx.TokenBudget(time_scale=named.time_scale, **kw)


def generate(named, config, steps=4):
    fast = ditfx.optimize(named.model, config)
    with ditfx.generation(fast):
        out = zoo.run_loop(named, fast, steps=steps)
    return out, fast


def test_the_weak_graph_of_the_reference_dit_is_the_dit_at_the_coarse_patch_size():
    """The graph rewrite against the module built at patch 4 with the converted layers: the same function. DiT-T/2
    has 16 tokens and a head dimension of 16, so the literals cannot be told apart by value."""
    named = zoo.load("DiT-T/2")
    gm, inputs = capture_graph(named.model, fullgraph=True, call=named)
    sites = find_sites(gm, analyse(gm).roles)
    weak = weak_graph(gm, sites, 4)
    tensors = zero_shot_tensors(gm, sites, inputs, 4)
    with torch.no_grad():
        got = weak.gm(*inputs, *[tensors[k] for k in weak.keys])[0]
    coarse = build_dit("DiT-T/2", patch_size=4)
    state = {k: v for k, v in named.model.state_dict().items()
             if not k.startswith(("x_embedder.proj.weight", "pos_embed", "final_layer.linear"))}
    coarse.load_state_dict(state, strict=False)
    with torch.no_grad():
        coarse.x_embedder.proj.weight.copy_(tensors["embed.weight"])
        coarse.pos_embed.copy_(tensors["pos_embed"])
        coarse.final_layer.linear.weight.copy_(tensors["deembed.weight"])
        coarse.final_layer.linear.bias.copy_(tensors["deembed.bias"])
        expected = coarse.eval()(**named.inputs)
    assert (got - expected).abs().max() <= TOL
    assert weak.tokens == 4 and sites.tokens == 16


def test_the_weak_graph_of_flux_is_flux_on_coarse_tokens():
    """Packed tokens: the rewrite (joint text + image attention, rotary ids at coarse centres) against a Flux built
    for 2x2 groups of packed tokens with the converted layers, fed the grouped tokens and the coarse ids."""
    from diffusers import FluxTransformer2DModel

    named = zoo.load("tiny:flux")
    gm, inputs = capture_graph(named.model, fullgraph=True, call=named)
    sites = find_sites(gm, analyse(gm).roles, inputs)
    weak = weak_graph(gm, sites, 4)
    tensors = zero_shot_tensors(gm, sites, inputs, 4)
    with torch.no_grad():
        got = weak.gm(*inputs, *[tensors[k] for k in weak.keys])[0]
    config = {**named.model.config, "in_channels": 64, "out_channels": 64}
    coarse = FluxTransformer2DModel.from_config(config)
    state = {k: v for k, v in named.model.state_dict().items() if not k.startswith(("x_embedder.", "proj_out."))}
    coarse.load_state_dict(state, strict=False)
    with torch.no_grad():
        coarse.x_embedder.weight.copy_(tensors["embed.weight"])
        coarse.x_embedder.bias.copy_(named.model.x_embedder.bias)
        coarse.proj_out.weight.copy_(tensors["deembed.weight"])
        coarse.proj_out.bias.copy_(tensors["deembed.bias"])
        x = named.inputs["hidden_states"]
        grouped = x.view(2, 2, 2, 2, 2, 16).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 64)
        ids = zoo.image_ids(4, 4).view(2, 2, 2, 2, 3)[:, 0, :, 0].reshape(4, 3) + torch.tensor([0.0, 1.0, 1.0])
        out = coarse.eval()(**{**named.inputs, "hidden_states": grouped, "img_ids": ids}, return_dict=False)[0]
    expected = out.view(2, 2, 2, 2, 2, 16).permute(0, 1, 3, 2, 4, 5).reshape(2, 16, 16)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("name", CONVERTED)
def test_the_full_budget_is_the_native_model(name):
    """weak_until=0: no weak step, the weak mode built and unused; exact against eager, no fallback."""
    named = zoo.load(name)
    expected = zoo.run_loop(named, steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no technique turned off
        got, fast = generate(named, ditfx.Config(compiler="eager", budget=budget(named, weak_until=0.0)))
    (executor,) = ditfx.api._runtime(fast).executors
    assert set(executor.plan.modes) == {mode_key(4)}
    assert (got - expected).abs().max() <= TOL
    assert ditfx.stats(fast).modes == {"native": {"calls": 4, "flops": ditfx.stats(fast).flops,
                                                  "tokens": 4 * 2 * executor.plan.tokens}}


@pytest.mark.parametrize("name", sorted(set(zoo.names()) - set(CONVERTED) - {"DiT-S/2", "DiT-B/2", "DiT-L/2",
                                                                          "DiT-XL/2", "DiT-S/4", "DiT-S/8",
                                                                          "DiT-B/4", "DiT-B/8", "DiT-L/4",
                                                                          "DiT-L/8", "DiT-XL/4", "DiT-XL/8"}))
def test_families_that_cannot_be_converted_stay_exact_and_say_so(name):
    named = zoo.load(name)
    expected = zoo.run_loop(named, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, fast = generate(named, ditfx.Config(compiler="eager", budget=budget(named, weak_until=0.5),
                                                 cache=ditfx.DynamicCache(0.0)), steps=3)
    messages = [str(w.message) for w in caught if str(w.message).startswith("ditfx")]
    (executor,) = ditfx.api._runtime(fast).executors
    if not executor.plan.modes:
        assert any("budget off for this graph" in m for m in messages), messages
    assert (got - expected).abs().max() <= TOL if not executor.plan.modes else got.isfinite().all()


def random_adapter(named, rank=2, seed=1):
    gm, inputs = capture_graph(named.model, fullgraph=True, call=named)
    sites = find_sites(gm, analyse(gm).roles)
    weak = weak_graph(gm, sites, 4, lora_rank=rank)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) * 0.05 for k, s in weak.shapes.items()}
    return BudgetAdapter(4, sites.patch, tensors, lora_rank=rank, time_scale=named.time_scale)


@pytest.mark.parametrize("name", ["tiny:dit", "tiny:sd3"])
def test_an_adapter_leaves_the_native_mode_bit_identical(name, tmp_path):
    named = zoo.load(name)
    adapter = BudgetAdapter.load(random_adapter(named).save(tmp_path / "a.safetensors"))
    assert any(k.startswith("lora.") for k in adapter.tensors)
    expected = zoo.run_loop(named, steps=4)
    got, _ = generate(named, ditfx.Config(compiler="eager", budget=budget(named, adapter=adapter, weak_until=0.0)))
    assert torch.equal(got, expected)
    weak, _ = generate(named, ditfx.Config(compiler="eager", budget=budget(named, adapter=adapter, weak_until=0.5)))
    assert (weak - expected).abs().max() > 1e-3  # the weak steps ran the adapter


def test_an_adapter_for_another_model_turns_the_budget_off_with_the_reason():
    named = zoo.load("tiny:dit")
    adapter = random_adapter(zoo.load("tiny:pixart"))
    expected = zoo.run_loop(named, steps=3)
    with pytest.warns(UserWarning, match="budget off for this graph: the adapter does not fit"):
        got, _ = generate(named, ditfx.Config(compiler="eager", cache=ditfx.DynamicCache(0.0),
                                              budget=budget(named, adapter=adapter, weak_until=0.5)), steps=3)
    assert (got - expected).abs().max() <= TOL


def test_bad_adapter_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(AdapterError, match="no budget adapter at"):
        BudgetAdapter.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="bad.safetensors"):
        ditfx.TokenBudget(adapter=bad, weak_until=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        ditfx.TokenBudget(weak_until=0.5, flops=0.6)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        ditfx.TokenBudget(flops=1.5)


def test_the_weak_steps_are_the_fewest_that_meet_the_flops():
    assert weak_steps_for(20, 0.25, 0.6) == 11  # 11 * 0.25 + 9 = 11.75 <= 12 < 10 * 0.25 + 10
    assert weak_steps_for(20, 0.25, 1.0) == 0 and weak_steps_for(20, 0.25, 0.1) == 20
    s = BudgetSchedule(times=[1.0, 0.75, 0.5, 0.25], gaps=[0.1, 0.05, 0.2, 0.3], flops_ratio=0.25).choose(0.7)
    assert s.weak == [True, True, False, False] and s.is_weak(0.74) and not s.is_weak(0.3)


def test_a_weak_step_costs_what_the_cost_model_says():
    """FLOPs of the weak graph by torch.utils.flop_counter against the plan's cost model, and the ratio against
    the native graph; at DiT-T/2's shapes the linear terms shrink 4x with the tokens."""
    named = zoo.load("DiT-T/2")
    fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager", budget=budget(named, weak_until=0.5)))
    with torch.no_grad():
        fast(**named.inputs)
    (executor,) = ditfx.api._runtime(fast).executors
    weak_plan = executor.plan.modes[mode_key(4)]
    gm, inputs = capture_graph(named.model, fullgraph=True, call=named)
    sites = find_sites(gm, analyse(gm).roles)
    weak = weak_graph(gm, sites, 4)
    tensors = zero_shot_tensors(gm, sites, inputs, 4)
    counted = {}
    weak_inputs = [*inputs, *[tensors[k] for k in weak.keys]]
    for name, run in (("native", lambda: gm(*inputs)), ("weak", lambda: weak.gm(*weak_inputs))):
        # the math attention path: the counter sees its matmuls (it does not count the fused CPU kernel)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            run()
        counted[name] = counter.get_total_flops()
    model = {"native": sum(executor.plan.flops.values()), "weak": sum(weak_plan.flops.values())}
    assert model == counted
    assert 0.2 < model["weak"] / model["native"] < 0.3


def test_no_graph_breaks_or_recompiles_after_each_modes_first_call():
    named = zoo.load("tiny:dit")
    config = ditfx.Config(compiler="aot_eager", budget=budget(named, weak_until=0.5),
                          cache=ditfx.DynamicCache(threshold=0.05))
    fast = ditfx.optimize(named.model, config)
    with ditfx.generation(fast):
        zoo.run_loop(named, fast, steps=6)
    first = ditfx.stats(fast)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            with ditfx.generation(fast):
                zoo.run_loop(named, fast, steps=6)
    s = ditfx.stats(fast)
    assert s.graph_breaks == 0 and s.recompiles == 0 and s.region_compiles == first.region_compiles
    assert set(s.modes) == {"native", "p4"} and s.modes["p4"]["calls"] == 9 and s.modes["native"]["calls"] == 9


def test_per_sample_state_survives_a_mode_switch():
    """Guidance drops rows and the cache keeps per-sample values on both sides of the switch: at their exact
    limits the combination equals the budget alone, and a second generation equals the first."""
    model, kw = tiny_model("dit", batch=4)
    scale = zoo.load("tiny:dit").time_scale

    def run(**techniques):
        fast = ditfx.optimize(model, ditfx.Config(compiler="eager", budget=ditfx.TokenBudget(
            weak_until=0.5, time_scale=scale), **techniques))
        return cfg_loop(fast, kw, "dit", steps=6), fast

    expected, _ = run()
    torch._dynamo.reset()
    got, fast = run(cache=ditfx.DynamicCache(0.0), guidance=ditfx.AdaptiveGuidance(gamma=1.0))
    assert (got - expected).abs().max() <= TOL
    assert (cfg_loop(fast, kw, "dit", steps=6) - expected).abs().max() <= TOL
    torch._dynamo.reset()
    got, fast = run(cache=ditfx.DynamicCache(0.05), guidance=ditfx.AdaptiveGuidance(gamma=-1.0))
    s = ditfx.stats(fast)
    assert got.isfinite().all() and s.nfe_skipped > 0 and set(s.modes) == {"native", "p4"}
    assert s.modes["p4"]["tokens"] < s.modes["native"]["tokens"]  # rows dropped in both modes


def test_unconvertible_models_give_a_clear_error():
    named = zoo.load("tiny:wan")
    gm, _ = capture_graph(named.model, fullgraph=True, call=named)
    with pytest.raises(SiteError, match="video latents"):
        find_sites(gm, analyse(gm).roles)
    named = zoo.load("tiny:flux")
    gm, inputs = capture_graph(named.model, fullgraph=True, call=named)
    inputs = [torch.zeros_like(v) if v.shape == (16, 3) else v for v in inputs]
    with pytest.raises(SiteError, match="row-major grid"):
        find_sites(gm, analyse(gm).roles, inputs)
    named = zoo.load("DiT-T/2")
    gm, _ = capture_graph(named.model, fullgraph=True, call=named)
    sites = find_sites(gm, analyse(gm).roles)
    with pytest.raises(BudgetConversionError, match="multiple of the native"):
        weak_graph(gm, sites, 3)
    with pytest.raises(BudgetConversionError, match="does not tile"):
        weak_graph(gm, sites, 16)


def test_distillation_trains_the_weak_mode_on_the_models_own_predictions(tmp_path):
    named = zoo.load("tiny:dit", batch=2)
    before = {k: v.clone() for k, v in named.model.state_dict().items()}
    adapter = ditfx.budget.distill(named.model, lambda m: zoo.run_loop(named, m, steps=6), steps=60, lora_rank=2,
                                   weak_until=0.75, time_scale=named.time_scale, generations=2, lr=3e-3,
                                   progress=None)
    r = adapter.record
    assert r["steps"] == 60 and r["held_out_loss"] < r["held_out_loss_zero_shot"] and r["loss_curve"]
    assert all(torch.equal(v, named.model.state_dict()[k]) for k, v in before.items())  # the model untouched
    assert all(p.requires_grad for p in named.model.parameters())
    path = adapter.save(tmp_path / "tiny.safetensors")
    from ditfx.budget.training import plot_loss

    plot_loss(adapter, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = BudgetAdapter.load(path)
    assert loaded.record["steps"] == 60 and loaded.lora_rank == 2
    torch._dynamo.reset()
    expected = zoo.run_loop(named, steps=4)
    got, fast = generate(named, ditfx.Config(compiler="eager", budget=budget(named, adapter=loaded, weak_until=0.0)))
    assert torch.equal(got, expected)


def test_distillation_refuses_an_optimized_model():
    named = zoo.load("tiny:dit")
    fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager"))
    with pytest.raises(ValueError, match="before ditfx.optimize"):
        ditfx.budget.distill(fast, lambda m: None, steps=1, progress=None)
    with pytest.raises(ValueError, match="needs run"):
        ditfx.budget.distill(named.model, progress=None)


def test_calibration_measures_the_gap_per_step_and_the_budget_runs_the_smallest(tmp_path):
    named = zoo.load("tiny:dit")
    schedule = ditfx.budget.calibrate(named.model, lambda m: zoo.run_loop(named, m, steps=8), generations=1,
                                      time_scale=named.time_scale, progress=None)
    assert len(schedule.times) == 8 and all(g > 0 for g in schedule.gaps) and 0.2 < schedule.flops_ratio < 0.35
    path = schedule.save(tmp_path / "schedule.json")
    schedule.plot(tmp_path / "schedule.png")
    config = budget(named, calibrated=path, flops=0.7)
    chosen = config.calibrated
    smallest = sorted(range(8), key=lambda i: chosen.gaps[i])[:sum(chosen.weak)]
    assert sorted(i for i, w in enumerate(chosen.weak) if w) == sorted(smallest)
    got, fast = generate(named, ditfx.Config(compiler="eager", budget=config), steps=8)
    assert ditfx.stats(fast).modes["p4"]["calls"] == sum(chosen.weak)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a ditfx budget schedule"):
        BudgetSchedule.load(bad)


def test_more_than_two_levels():
    """Patch 8 first, then 4, then native: each call at the coarsest level whose fraction covers it."""
    model = zoo.randomize(build_dit("DiT-T/2", input_size=16))  # 8x8 patch-2 tokens: 16 at patch 4, 4 at patch 8
    named = zoo.NamedModel(model, dict(x=torch.randn(2, 4, 16, 16), t=torch.full((2,), 700.0), y=torch.tensor([1, 2])),
                           "x", "t", 1000.0, False)
    config = ditfx.Config(compiler="eager", budget=budget(named, patch_size=[8, 4], weak_until=[0.25, 0.5]))
    got, fast = generate(named, config, steps=8)
    modes = ditfx.stats(fast).modes
    assert {m: v["calls"] for m, v in modes.items()} == {"p8": 2, "p4": 2, "native": 4}
    assert modes["p8"]["tokens"] == 2 * 2 * 4 and modes["p4"]["tokens"] == 2 * 2 * 16
    with pytest.raises(ValueError, match="one weak_until per level"):
        ditfx.TokenBudget(patch_size=[8, 4], weak_until=[0.5])
    with pytest.raises(ValueError, match="not flops"):
        ditfx.TokenBudget(patch_size=[8, 4], weak_until=[0.2, 0.5], flops=0.5)


def test_merged_lora_is_the_low_rank_path_at_the_base_cost():
    named = zoo.load("tiny:dit")
    adapter = random_adapter(named, rank=2)
    runs = {}
    for merge in (True, False):
        torch._dynamo.reset()
        cfg = ditfx.Config(compiler="eager", budget=budget(named, adapter=adapter, weak_until=1.0, merge_lora=merge))
        got, fast = generate(named, cfg)
        runs[merge] = (got, ditfx.stats(fast).modes["p4"]["flops"])
    assert (runs[True][0] - runs[False][0]).abs().max() <= TOL
    assert runs[True][1] < runs[False][1]


def test_a_zero_shot_adapter_is_the_zero_shot_mode(tmp_path):
    named = zoo.load("tiny:sd3")
    adapter = ditfx.budget.zero_shot(named.model, lambda m: named(m), time_scale=named.time_scale)
    assert adapter.zero_shot and adapter.patch == 4 and not adapter.lora_rank
    adapter = BudgetAdapter.load(adapter.save(tmp_path))
    got, _ = generate(named, ditfx.Config(compiler="eager", budget=budget(named, adapter=adapter, weak_until=0.5)))
    torch._dynamo.reset()
    expected, _ = generate(named, ditfx.Config(compiler="eager", budget=budget(named, weak_until=0.5)))
    assert (got - expected).abs().max() <= TOL


def test_an_adapter_for_another_model_class_is_refused_by_optimize():
    named = zoo.load("tiny:dit")
    adapter = random_adapter(named)
    adapter.model = {"class": "PixArtTransformer2DModel"}
    with pytest.raises(ValueError, match="made for a PixArtTransformer2DModel"):
        ditfx.optimize(named.model, ditfx.Config(budget=ditfx.TokenBudget(adapter=adapter, weak_until=0.5)))
