"""History attention (ARD), started: the training forward's masks and the history's FLOPs."""
import pytest
import torch
import torch.nn.functional as F

from ditfx.history import block_causal, block_diagonal, block_mask, dense, history_flops


def test_the_history_costs_the_papers_1_1_percent_at_dit_xl2_shapes():
    cost = history_flops(steps=4, tokens=256, width=1152, depth=28, history_layers=6)
    assert round(100 * cost.ratio, 3) == 1.148
    assert history_flops(4, 256, 1152, 28, 0).extra == 0
    with pytest.raises(ValueError, match="history_layers"):
        history_flops(4, 256, 1152, 28, 29)


def test_the_masks_are_block_causal_and_block_diagonal():
    causal, diagonal = dense(block_causal(2), 6), dense(block_diagonal(2), 6)
    steps = torch.arange(6) // 2
    assert torch.equal(causal, steps[None, :] <= steps[:, None])
    assert torch.equal(diagonal, steps[None, :] == steps[:, None])


@pytest.mark.parametrize("mask", [block_causal, block_diagonal])
def test_flex_attention_with_the_block_mask_is_sdpa_with_the_dense_mask(mask):
    from torch.nn.attention.flex_attention import flex_attention

    tokens, steps = 16, 4
    n = tokens * steps
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=block_mask(mask(tokens), n))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense(mask(tokens), n))
    assert (got - expected).abs().max() <= 1e-10


# ------------------------------------------------------------------------------------------ inference


def _block_step(block, x, c, history):
    """One reference DiT block whose attention also reads ``history`` (earlier steps' k, v); returns its k, v."""
    from ditfx.models.dit import modulate

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    h = modulate(block.norm1(x), shift_msa, scale_msa)
    b, n, d = h.shape
    qkv = block.attn.qkv(h).reshape(b, n, 3, block.attn.num_heads, block.attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    keys = torch.cat([*(hk for hk, _ in history), k], dim=2)
    values = torch.cat([*(hv for _, hv in history), v], dim=2)
    a = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape(b, n, d)
    x = x + gate_msa.unsqueeze(1) * block.attn.proj(a)
    x = x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
    return x, (k, v)


def reference_with_history(model, xs, ts, y, layers):
    """The reference DiT step by step, its lower ``layers`` blocks attending to the earlier steps' keys."""
    outs, history = [], [[] for _ in model.blocks]
    with torch.no_grad():
        for x, t in zip(xs, ts):
            h = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(t) + model.y_embedder(y)
            for i, block in enumerate(model.blocks):
                h, kv = _block_step(block, h, c, history[i] if i < layers else [])
                if i < layers:
                    history[i].append(kv)
            outs.append(model.unpatchify(model.final_layer(h, c)))
    return outs


def student_steps(fast, xs, ts, y):
    import ditfx

    with ditfx.generation(fast), torch.no_grad():
        return [fast(x, t, y) for x, t in zip(xs, ts)]


@pytest.fixture
def teacher_forced():
    from ditfx.models import zoo

    named = zoo.load("DiT-T/2", batch=2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    ts = [torch.full((2,), 999.0 * (1 - k / 3)) for k in range(3)]
    return named.model, xs, ts, torch.tensor([1, 2])


@pytest.mark.parametrize("layers", [0, 2, 4])
def test_cached_history_equals_the_step_by_step_reference(teacher_forced, layers):
    import ditfx

    model, xs, ts, y = teacher_forced
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(layers, steps=3)))
    expected = reference_with_history(model, xs, ts, y, layers)
    got = student_steps(fast, xs, ts, y)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max() <= 1e-5, step
    if layers:  # the history matters, and a second generation starts afresh
        plain = reference_with_history(model, xs, ts, y, 0)
        assert (got[2] - plain[2]).abs().max() > 1e-4
        again = student_steps(fast, xs, ts, y)
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(again, expected))
    s = ditfx.stats(fast)
    assert s.graph_breaks == 0 and s.recompiles == 0
    torch._dynamo.reset()


def test_the_history_of_one_sample_never_reaches_another(teacher_forced):
    import ditfx

    model, xs, ts, y = teacher_forced
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, steps=3)))
    both = student_steps(fast, xs, ts, y)
    for row in range(2):
        alone = reference_with_history(model, [x[row:row + 1] for x in xs], [t[row:row + 1] for t in ts],
                                       y[row:row + 1], 2)
        assert all((a[row:row + 1] - b).abs().max() <= 1e-5 for a, b in zip(both, alone))
    torch._dynamo.reset()


def test_a_generation_longer_than_the_buffer_is_refused(teacher_forced):
    import ditfx

    model, xs, ts, y = teacher_forced
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, steps=2)))
    with pytest.raises(RuntimeError, match="holds 2 steps"):
        student_steps(fast, xs, ts, y)
    with pytest.raises(ValueError, match="cannot be combined"):
        ditfx.Config(history=ditfx.HistoryAttention(2), cache=ditfx.DynamicCache(0.1))
    torch._dynamo.reset()


@pytest.mark.parametrize("layers", [0, 2])
def test_the_one_shot_forward_equals_the_cached_steps(teacher_forced, layers):
    """The masked one-shot training forward on the stacked teacher-forced inputs, against the step-by-step
    inference with the key/value history, per step."""
    import ditfx
    from ditfx.history.oneshot import one_shot

    model, xs, ts, y = teacher_forced
    torch._dynamo.reset()
    with torch.no_grad():
        stacked = one_shot(model, steps=3, layers=layers)(torch.cat(xs), torch.cat(ts), y.repeat(3))
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(layers, steps=3)))
    cached = student_steps(fast, xs, ts, y)
    for step in range(3):
        assert (stacked[2 * step:2 * step + 2] - cached[step]).abs().max() <= 1e-5, step
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["tiny:dit", "tiny:sd3", "tiny:pixart"])
def test_one_shot_equals_cached_on_diffusers_families(name):
    """Self-attention (DiT), joint text + image attention (SD3: the text keys are kept per step) and
    self- plus cross-attention (PixArt: the cross-attention reads no history)."""
    import ditfx
    from ditfx.history.oneshot import one_shot
    from ditfx.models import zoo

    named = zoo.load(name, batch=2)
    batch, steps = 2, 3
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(named.inputs[named.latents].shape, generator=g) for _ in range(steps)]
    ts = [torch.full((batch,), named.time_scale * (1 - k / steps)) for k in range(steps)]

    def per_step(k):
        return {**named.inputs, named.latents: xs[k], named.timestep: ts[k]}

    def stacked_inputs():
        out = {}
        for key, value in named.inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                out[key] = torch.cat([per_step(k)[key] for k in range(steps)])
            else:
                out[key] = value
        return out

    torch._dynamo.reset()
    with torch.no_grad():
        stacked = one_shot(named.model, steps, 1)(**stacked_inputs(), return_dict=False)[0]
    torch._dynamo.reset()
    fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(1, steps)))
    with ditfx.generation(fast), torch.no_grad():
        cached = [fast(**per_step(k), return_dict=False)[0] for k in range(steps)]
    for k in range(steps):
        assert (stacked[k * batch:(k + 1) * batch] - cached[k]).abs().max() <= 1e-5, k
    torch._dynamo.reset()


def test_step_heads_in_the_one_shot_forward_and_the_cached_steps(teacher_forced):
    """Step-specific output heads (ARD's re-implementation: one de-embedding per student step): each step's rows
    of the one-shot forward and each cached call use that step's head."""
    import ditfx
    from ditfx.history.oneshot import one_shot

    model, xs, ts, y = teacher_forced
    lin = model.final_layer.linear
    g = torch.Generator().manual_seed(9)
    heads = {"weight": torch.stack([lin.weight.detach() + 0.1 * torch.randn(lin.weight.shape, generator=g)
                                    for _ in range(3)]),
             "bias": torch.stack([lin.bias.detach() + 0.1 * torch.randn(lin.bias.shape, generator=g)
                                  for _ in range(3)])}
    torch._dynamo.reset()
    with torch.no_grad():
        stacked = one_shot(model, 3, 2, heads)(torch.cat(xs), torch.cat(ts), y.repeat(3))
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, 3, heads=heads)))
    cached = student_steps(fast, xs, ts, y)
    for step in range(3):
        assert (stacked[2 * step:2 * step + 2] - cached[step]).abs().max() <= 1e-5, step
    plain = reference_with_history(model, xs, ts, y, 2)
    assert (cached[1] - plain[1]).abs().max() > 1e-3  # the heads changed the outputs
    with pytest.raises(ValueError, match="one output head per step"):
        ditfx.HistoryAttention(2, 4, heads=heads)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["reference", *__import__("ditfx.models.zoo", fromlist=["x"]).TINY_FAMILIES])
def test_no_history_is_the_model_and_history_runs_or_says_why_on_every_family(family):
    """layers=0 equals eager exactly with no warning; layers=1 either runs the history (its outputs then depend on
    the earlier steps) or turns the technique off with a warning naming it, and stays exact."""
    import warnings

    import ditfx
    from ditfx.models import zoo

    named = zoo.load("DiT-T/2" if family == "reference" else f"tiny:{family}")
    expected = zoo.run_loop(named, steps=3)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(0, 3)))
        with ditfx.generation(fast):
            got = zoo.run_loop(named, fast, steps=3)
    assert (got - expected).abs().max() <= 1e-5
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(1, 3)))
        with ditfx.generation(fast):
            got = zoo.run_loop(named, fast, steps=3)
    off = [str(w.message) for w in caught if "history" in str(w.message).lower()]
    (executor,) = ditfx.api._runtime(fast).executors
    if executor.plan.blocks_offering("history.kv@0"):
        assert got.isfinite().all() and (got - expected).abs().max() > 1e-6 and not off
    else:
        assert off and (got - expected).abs().max() <= 1e-5, off
    torch._dynamo.reset()


def test_the_history_follows_the_rows_guidance_drops(teacher_forced):
    """Adaptive Guidance stops computing the unconditional rows after the first step: the conditional rows keep
    their own history (per-sample state, re-batched), so they equal a history run on them alone."""
    import ditfx
    from ditfx.api import null_class

    model, xs, ts, y = teacher_forced
    null = torch.full_like(y, null_class(model))
    torch._dynamo.reset()
    fast = ditfx.optimize(model, ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, steps=3),
                                              guidance=ditfx.AdaptiveGuidance(gamma=-1.0)))
    both = student_steps(fast, [torch.cat([x, x]) for x in xs], [torch.cat([t, t]) for t in ts],
                         torch.cat([null, y]))
    alone = reference_with_history(model, xs, ts, y, 2)
    for step, (a, b) in enumerate(zip(both, alone)):
        assert (a[2:] - b).abs().max() <= 1e-5, step
    assert ditfx.stats(fast).nfe_skipped > 0
    torch._dynamo.reset()
