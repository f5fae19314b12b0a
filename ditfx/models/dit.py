"""Reference Diffusion Transformer (DiT) of Peebles & Xie, "Scalable Diffusion Models with
Transformers" (facebookresearch/DiT ``models.py``), written compile-first.

Module and parameter names follow the official code so its checkpoints load unchanged
(``x_embedder.proj``, ``t_embedder.mlp.0``, ``blocks.N.attn.qkv``, ``pos_embed``, ...).
The forward pass has no data-dependent Python control flow, so
``torch.compile(model, fullgraph=True)`` traces it without graph breaks.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ditfx.positional import MAX_PERIOD, sincos_1d

__all__ = ["DiT", "DiTConfig", "DIT_CONFIGS", "build_dit", "load_dit_checkpoint"]

FREQUENCY_EMBEDDING_SIZE = 256
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of a DiT; ``input_size`` is the latent side length (image side / 8)."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size",
                     "in_channels", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides hidden_size"
            )
        # The 2D sin-cos embedding splits channels into (row, col) x (sin, cos) quarters.
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of 4 for the 2D sin-cos "
                "positional embedding; round it to a multiple of 4"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "pick a patch_size that divides the latent side length"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(
                f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1); "
                "use 0 to drop the null class used for classifier-free guidance"
            )
        if self.mlp_hidden_size <= 0:
            raise ValueError(
                f"mlp_ratio={self.mlp_ratio} gives an empty MLP for "
                f"hidden_size={self.hidden_size}; use a positive mlp_ratio"
            )

    @property
    def out_channels(self) -> int:
        """Channels predicted per latent pixel: noise, plus the variance when ``learn_sigma``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Patches along one side of the latent."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image."""
        return self.grid_size**2

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def _standard_configs() -> dict[str, DiTConfig]:
    sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    configs = {
        f"DiT-{size}/{patch}": DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads,
                                         patch_size=patch)
        for size, (depth, hidden, heads) in sizes.items()
        for patch in (2, 4, 8)
    }
    configs["DiT-T/2"] = DiTConfig(depth=4, hidden_size=64, num_heads=4, patch_size=2,
                                   input_size=8, in_channels=4, num_classes=10)
    return configs


DIT_CONFIGS: types.MappingProxyType[str, DiTConfig] = types.MappingProxyType(_standard_configs())
"""Named configurations of the paper, plus the tiny ``DiT-T/2`` used by tests."""

_CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(DiTConfig))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-sample affine modulation of tokens: x (N, T, D), shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> Tensor:
    """(grid_size**2, dim) float32 fixed positional embedding of a row-major patch grid."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # The official code puts the column embedding in the first half of the channels;
    # pretrained checkpoints were trained with this order.
    halves = [sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)]
    return torch.cat(halves, dim=1).float()


class PatchEmbed(nn.Module):
    """Splits a latent into non-overlapping patches and projects each to a token."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)                     # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion timesteps: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: int = MAX_PERIOD) -> Tensor:
        """(N,) timesteps, possibly fractional -> (N, dim) float32 ``[cos, sin]`` features."""
        half = dim // 2
        # Same float32 operation order as the official code, so the features match it bit for bit.
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * steps / half)  # (half,)
        args = t[:, None].float() * freqs[None, :]            # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        # The features are float32; match the weights so half-precision models work.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; row ``num_classes`` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + has_null_class, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replaces labels by the null class: at random, or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        # Both conditions are Python-level (module mode, argument presence), not data-dependent.
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)  # (N,)
        return self.embedding_table(labels)                    # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x)                                     # (N, T, 3 * D)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (N, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)       # 3 x (N, h, T, d)
        x = F.scaled_dot_product_attention(q, k, v)          # (N, h, T, d)
        x = x.transpose(1, 2).reshape(batch, tokens, hidden)  # (N, T, D)
        return self.proj(x)                                  # (N, T, D)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1, tanh-approximated GELU, fc2."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(x))  # (N, T, mlp_hidden)
        return self.fc2(x)         # (N, T, D)


def _block_reuse_key(block: DiTBlock, x: Tensor, c: Tensor) -> int:
    """What makes two block calls one traced subgraph: the hyper-parameters the block's forward bakes into its
    graph (fixed at construction) and the inputs' dtypes; Dynamo traces this to a constant. Weights are reached
    through the block, so they are the calling block's own. Shapes are left out: hashing them would specialise a
    dynamic batch (torch.export), and every block of a DiT sees the same shapes; ditfx checks every stamped-out
    call's operands against the traced ones (ditfx/graph/inline.py). One attribute read: every module attribute
    Dynamo reads here is traced again for every block."""
    return hash((block.structure, x.dtype, c.dtype))


# torch >= 2.13 (2.11 has no such argument) lets a nested compile region name a reuse key
REGION_REUSE_KEYS = "reuse_hash_fn" in inspect.signature(torch.compiler.nested_compile_region).parameters


def _traced_once(forward):
    """``nested_compile_region``, keyed by ``_block_reuse_key`` where torch supports a key (>= 2.13): a block
    whose key matches an earlier one is stamped out without re-checking its inputs against the first block's
    guards (docs/block_cache.md has the capture times)."""
    if REGION_REUSE_KEYS:
        return torch.compiler.nested_compile_region(forward, reuse_hash_fn=_block_reuse_key)
    return torch.compiler.nested_compile_region(forward)


class DiTBlock(nn.Module):
    """Transformer block with norms modulated and residuals gated by the condition (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_size: int) -> None:
        super().__init__()
        self.structure = (hidden_size, num_heads, mlp_hidden_size)  # what _block_reuse_key tells blocks apart by
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, mlp_hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    # Traced once by torch.compile and stamped out for the other blocks: capture time stops growing with depth.
    @_traced_once
    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        )
        attn_out = self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * attn_out                             # (N, T, D)
        mlp_out = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))    # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * mlp_out                           # (N, T, D)


class FinalLayer(nn.Module):
    """Modulated norm and projection of each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)           # (N, T, D)
        return self.linear(x)                                    # (N, T, p * p * out_channels)


class DiT(nn.Module):
    """Class-conditional latent diffusion transformer; predicts noise (and variance)."""

    # Declares the repeated transformer block, following the diffusers convention.
    _repeated_blocks = ("DiTBlock",)

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size,
                                        config.class_dropout_prob)
        # A frozen Parameter rather than a buffer: official checkpoints store it as a parameter.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_hidden_size)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official initialisation; adaLN-Zero makes each block the identity and the output zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_2d_pos_embed(self.config.hidden_size, self.config.grid_size))
        # Initialise the patch projection like a Linear over its flattened kernel.
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p * p * C) tokens -> (N, C, H, W) latent."""
        grid, p, channels = self.config.grid_size, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid, grid, p, p, channels)        # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                         # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], channels, grid * p, grid * p)   # (N, C, H, W)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W)."""
        size, channels = self.config.input_size, self.config.in_channels
        static = all(isinstance(d, int) for d in x.shape)  # symbolic sizes (a FLOP formula) are not checked
        if static and (x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size)):
            # the position embedding is fixed at the configured size: say so, not a broadcast error deep inside
            raise ValueError(f"this DiT takes latents of shape (N, {channels}, {size}, {size}), got "
                             f"{tuple(x.shape)}: resize the latents, or build the model with input_size="
                             f"{x.shape[-1] if x.dim() == 4 else '...'}")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        t = self.t_embedder(t)                   # (N, D)
        y = self.y_embedder(y)                   # (N, D)
        c = t + y                                # (N, D)
        for block in self.blocks:
            x = block(x, c)                      # (N, T, D)
        x = self.final_layer(x, c)               # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x)                # (N, out_channels, H, W)


def _check_override_names(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown DiTConfig field(s) {unknown}; valid fields: {list(_CONFIG_FIELDS)}"
        )


def _registered_config(name: str) -> DiTConfig:
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; valid names: {list(DIT_CONFIGS)}")
    return DIT_CONFIGS[name]


def build_dit(name: str, **overrides) -> DiT:
    """Builds the registered config ``name`` (e.g. ``"DiT-XL/2"``) with ``overrides`` applied."""
    config = _registered_config(name)
    _check_override_names(overrides)
    return DiT(dataclasses.replace(config, **overrides))


_NESTED_STATE_KEYS = ("ema", "model")  # EMA weights first: they are the ones sampled from.


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        checkpoint = load_file(path)
    elif suffix in (".pt", ".pth", ".bin"):
        # Official training checkpoints also pickle their argparse arguments; allow only that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"unsupported checkpoint suffix {suffix!r} for {path}; "
            "use .safetensors, .pt, .pth or .bin"
        )
    if all(isinstance(value, Tensor) for value in checkpoint.values()):
        return checkpoint
    for key in _NESTED_STATE_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    raise ValueError(
        f"{path} is neither a state dict nor one nested under {list(_NESTED_STATE_KEYS)}; "
        f"top-level keys: {list(checkpoint)[:10]}"
    )


def _shape(state: dict[str, Tensor], key: str) -> torch.Size:
    if key not in state:
        raise ValueError(f"cannot infer the DiT config: checkpoint has no {key!r}; pass name=")
    return state[key].shape


def _registered_num_heads(depth: int, hidden_size: int) -> int:
    heads = {
        config.num_heads
        for config in DIT_CONFIGS.values()
        if (config.depth, config.hidden_size) == (depth, hidden_size)
    }
    if len(heads) != 1:
        raise ValueError(
            f"cannot infer num_heads for depth={depth}, hidden_size={hidden_size}: no registered "
            f"config matches; pass name= (one of {list(DIT_CONFIGS)}) or num_heads="
        )
    return heads.pop()


def _infer_config(state: dict[str, Tensor], overrides: dict) -> DiTConfig:
    """Reads the architecture off the tensor shapes; ``overrides`` replace inferred fields."""
    hidden_size, in_channels, patch_size, _ = _shape(state, "x_embedder.proj.weight")
    num_patches = _shape(state, "pos_embed")[1]
    table_rows = _shape(state, "y_embedder.embedding_table.weight")[0]
    mlp_hidden_size = _shape(state, "blocks.0.mlp.fc1.weight")[0]
    out_channels = _shape(state, "final_layer.linear.weight")[0] // (patch_size * patch_size)
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"checkpoint predicts {out_channels} channels for {in_channels} input channels; "
            "expected the same or twice as many (learn_sigma)"
        )
    # A model trained with class dropout has one extra embedding row: the null class.
    class_dropout_prob = overrides.get("class_dropout_prob", DiTConfig.class_dropout_prob)
    null_class_rows = 1 if class_dropout_prob > 0 else 0
    if "num_heads" in overrides:
        num_heads = overrides["num_heads"]
    else:
        num_heads = _registered_num_heads(depth, hidden_size)
    inferred = dict(
        depth=depth,
        hidden_size=hidden_size,
        num_heads=num_heads,
        patch_size=patch_size,
        input_size=math.isqrt(num_patches) * patch_size,
        in_channels=in_channels,
        num_classes=table_rows - null_class_rows,
        learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=mlp_hidden_size / hidden_size,
    )
    return DiTConfig(**{**inferred, **overrides})


def _check_state_dict_matches(model: DiT, state: dict[str, Tensor], shown: int = 5) -> None:
    """Raises a ValueError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(keys)} {kind} {keys[:shown]}"
        for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(
            f"checkpoint does not match {model.config}: " + "; ".join(problems)
            + ". Check name= and the overrides."
        )


def load_dit_checkpoint(path: str | os.PathLike, name: str | None = None, **overrides) -> DiT:
    """Loads an official-format DiT checkpoint (strictly), returned on CPU in eval mode.

    Reads ``.safetensors`` or, with ``weights_only=True``, ``.pt``/``.pth``/``.bin`` files holding
    a state dict, possibly nested under ``"ema"`` or ``"model"``. Without ``name`` the architecture
    is inferred from the tensor shapes (the head count from the registry).
    """
    _check_override_names(overrides)
    state = _read_state_dict(Path(path))
    if name is None:
        config = _infer_config(state, overrides)
    else:
        config = dataclasses.replace(_registered_config(name), **overrides)
    # Build without allocating, then adopt the checkpoint's tensors as the parameters.
    with torch.device("meta"):
        model = DiT(config)
    _check_state_dict_matches(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
