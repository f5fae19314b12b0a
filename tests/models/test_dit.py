"""Tests of the reference DiT model: shapes, initialisation, checkpoints, compilation."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ditfx.models import DIT_CONFIGS, DiT, DiTConfig, build_dit, load_dit_checkpoint

TINY = "DiT-T/2"


def tiny_inputs(config: DiTConfig, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size,
                    generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return x, t, y


def randomized_tiny_dit(**overrides) -> DiT:
    """A tiny DiT with every weight random, so no zero-initialised layer hides a bug."""
    torch.manual_seed(0)
    model = build_dit(TINY, **overrides).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.normal_(std=0.1)
    return model


def expected_parameter_count(config: DiTConfig) -> int:
    """Closed-form parameter count of the official architecture."""
    d, p, m = config.hidden_size, config.patch_size, config.mlp_hidden_size
    patch_embed = config.in_channels * p * p * d + d
    pos_embed = config.num_patches * d
    timestep = 256 * d + d + d * d + d
    labels = (config.num_classes + (config.class_dropout_prob > 0)) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (6 * d * d + 6 * d)
    final_out = p * p * config.out_channels
    final = (2 * d * d + 2 * d) + (d * final_out + final_out)
    return patch_embed + pos_embed + timestep + labels + config.depth * block + final


def numpy_sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """The 2D sin-cos formula per token: quarters sin(col), cos(col), sin(row), cos(row)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    token = np.arange(grid_size * grid_size)
    row, col = token // grid_size, token % grid_size
    col_angles = np.outer(col, omega)
    row_angles = np.outer(row, omega)
    return np.concatenate(
        [np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], axis=1
    )


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(learn_sigma):
    model = build_dit(TINY, learn_sigma=learn_sigma).eval()
    x, t, y = tiny_inputs(model.config)
    out = model(x, t, y)
    expected_channels = 8 if learn_sigma else 4
    assert model.out_channels == expected_channels
    assert out.shape == (2, expected_channels, 8, 8)


def test_integer_and_float_timesteps_agree():
    model = randomized_tiny_dit()
    x, t, y = tiny_inputs(model.config)
    torch.testing.assert_close(model(x, t, y), model(x, t.float(), y), rtol=0, atol=0)


def test_pos_embed_matches_numpy_formula():
    model = build_dit(TINY, hidden_size=32, num_heads=4)
    expected = numpy_sincos_2d(32, model.config.grid_size)
    assert model.pos_embed.shape == (1, 16, 32)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(expected).float(),
                               rtol=0, atol=1e-6)


def test_adaln_zero_init_makes_blocks_identity_and_output_zero():
    model = build_dit(TINY).eval()
    x, t, y = tiny_inputs(model.config)
    tokens = model.x_embedder(x) + model.pos_embed
    condition = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, condition), tokens, rtol=0, atol=0)
    out = model(x, t, y)
    assert torch.count_nonzero(out) == 0


def test_unpatchify_inverts_patch_layout():
    model = build_dit(TINY, learn_sigma=False)
    p, grid = model.patch_size, model.config.grid_size
    image = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    # Token (i, j) holds its p x p patch, flattened channel-last as the final layer emits it.
    tokens = image.reshape(2, 4, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(2, grid**2, -1)
    torch.testing.assert_close(model.unpatchify(tokens), image, rtol=0, atol=0)


def test_label_dropout_uses_null_class():
    model = build_dit(TINY)
    embedder = model.y_embedder
    labels = torch.tensor([1, 2, 3])
    assert embedder.embedding_table.num_embeddings == 11
    dropped = embedder.drop_labels(labels, force_drop_ids=torch.tensor([1, 0, 1]))
    assert dropped.tolist() == [10, 2, 10]
    model.eval()
    torch.testing.assert_close(embedder(labels), embedder.embedding_table(labels))
    assert build_dit(TINY, class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_xl2_parameter_count_matches_paper():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert expected_parameter_count(DIT_CONFIGS["DiT-XL/2"]) == 675_129_632


@pytest.mark.parametrize("name", [TINY, "DiT-S/8", "DiT-B/4"])
def test_parameter_count_matches_closed_form(name):
    with torch.device("meta"):
        model = build_dit(name)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(model.config)


def test_standard_config_sizes():
    expected = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    for size, (depth, hidden, heads) in expected.items():
        for patch in (2, 4, 8):
            config = DIT_CONFIGS[f"DiT-{size}/{patch}"]
            assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (
                depth, hidden, heads, patch)
            assert (config.input_size, config.num_classes, config.learn_sigma) == (32, 1000, True)


def test_official_key_names():
    keys = set(build_dit(TINY).state_dict())
    for key in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight", "blocks.3.attn.qkv.weight",
                "blocks.3.attn.proj.weight", "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.weight",
                "blocks.3.adaLN_modulation.1.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.weight", "pos_embed"]:
        assert key in keys
    assert DiT._repeated_blocks == ("DiTBlock",)
    assert isinstance(build_dit(TINY).blocks, torch.nn.ModuleList)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", [TINY, None])
def test_checkpoint_round_trip(tmp_path, suffix, name):
    model = randomized_tiny_dit()
    path = tmp_path / f"dit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    loaded = load_dit_checkpoint(path, name=name)
    assert loaded.config == model.config
    assert not loaded.training
    assert not loaded.pos_embed.requires_grad
    x, t, y = tiny_inputs(model.config)
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_checkpoint_infers_non_default_fields(tmp_path):
    model = randomized_tiny_dit(learn_sigma=False, input_size=16, patch_size=4, num_classes=7)
    path = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), path)
    assert load_dit_checkpoint(path).config == model.config


def test_checkpoint_without_class_dropout_needs_override(tmp_path):
    model = randomized_tiny_dit(class_dropout_prob=0.0)
    path = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), path)
    assert load_dit_checkpoint(path, class_dropout_prob=0.0).config == model.config


def test_unregistered_shape_needs_name_or_heads(tmp_path):
    model = randomized_tiny_dit(depth=3)
    path = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), path)
    with pytest.raises(ValueError, match="num_heads"):
        load_dit_checkpoint(path)
    assert load_dit_checkpoint(path, name=TINY, depth=3).config == model.config
    assert load_dit_checkpoint(path, num_heads=4).config == model.config


def test_training_checkpoint_prefers_ema(tmp_path):
    ema = randomized_tiny_dit()
    path = tmp_path / "0001000.pt"
    # The layout of official training checkpoints, argparse arguments included.
    torch.save({"model": build_dit(TINY).state_dict(), "ema": ema.state_dict(),
                "args": argparse.Namespace(model=TINY)}, path)
    loaded = load_dit_checkpoint(path)
    x, t, y = tiny_inputs(ema.config)
    torch.testing.assert_close(loaded(x, t, y), ema(x, t, y), rtol=0, atol=0)


def test_checkpoint_with_missing_key_raises(tmp_path):
    state = build_dit(TINY).state_dict()
    del state["blocks.2.attn.qkv.bias"]
    path = tmp_path / "dit.safetensors"
    save_file(state, path)
    for name in (TINY, None):
        with pytest.raises(ValueError, match=r"missing keys \['blocks\.2\.attn\.qkv\.bias'\]"):
            load_dit_checkpoint(path, name=name)


def test_checkpoint_with_unexpected_key_raises(tmp_path):
    state = build_dit(TINY).state_dict()
    state["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "dit.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.attn\.extra'\]"):
        load_dit_checkpoint(path, name=TINY)


def test_checkpoint_with_wrong_shape_raises(tmp_path):
    state = build_dit(TINY).state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    path = tmp_path / "dit.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight: checkpoint \(128, 64\)"):
        load_dit_checkpoint(path, name=TINY)


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_dit_checkpoint(path)


def test_unsupported_checkpoint_suffix(tmp_path):
    path = tmp_path / "dit.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors"):
        load_dit_checkpoint(path)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = randomized_tiny_dit()
    x, t, y = tiny_inputs(model.config)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=0, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


def test_build_dit_rejects_bad_name_and_override():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="hidden_size"):
        build_dit(TINY, hiden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        load_dit_checkpoint("unused.pt", name=TINY, hiden_size=32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(input_size=9), "not divisible by patch_size"),
        (dict(depth=0), "depth must be a positive int"),
        (dict(hidden_size=66, num_heads=2), "multiple of 4"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DIT_CONFIGS[TINY], **overrides)
