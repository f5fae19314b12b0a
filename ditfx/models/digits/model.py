"""The digits DiT: a stock diffusers ``DiTTransformer2DModel``, so diffusers' cache hooks apply."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

# diffusers' AdaLayerNormZero builds CombinedTimestepLabelEmbeddings with class_dropout_prob=0.1,
# which is > 0, so its LabelEmbedding table gets one extra row after the real classes, and its
# token_drop replaces dropped labels with `num_classes`: the null (unconditional) class id is 10.
NULL_CLASS = NUM_CLASSES

TRANSFORMER_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,  # width 4 * 32 = 128
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
    # Exact GELU instead of DiT's tanh approximation: same quality, half the activation cost on CPU,
    # where training this model is compute-bound.
    "activation_fn": "gelu",
}


def build_transformer() -> DiTTransformer2DModel:
    """A freshly constructed (untrained) digits DiT with diffusers' default initialisation."""
    return DiTTransformer2DModel(**TRANSFORMER_CONFIG)


def initialise_like_dit(transformer: DiTTransformer2DModel) -> None:
    """Re-initialise as DiT does (Peebles & Xie 2023, sec. 3.2; their ``initialize_weights``).

    Xavier-uniform linears, then zero the adaLN-Zero modulation and the output projection so every
    block starts as the identity; this trains markedly faster than diffusers' default init.
    """
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch_proj = transformer.pos_embed.proj.weight
    nn.init.xavier_uniform_(patch_proj.view(patch_proj.shape[0], -1))
    for block in transformer.transformer_blocks:
        embedding = block.norm1.emb
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for projection in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(projection.weight)
        nn.init.zeros_(projection.bias)


def disable_builtin_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """Stop diffusers from dropping labels inside the model in train mode.

    Each block has its own LabelEmbedding, and in train mode each one drops labels with its own
    torch.rand draw, so a sample would be unconditional in some blocks and conditional in others.
    Training drops labels itself, once per sample, to NULL_CLASS instead. This changes no weights:
    the null row stays in the embedding table.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_class_labels(class_labels: torch.Tensor) -> None:
    """Raise a clear error for labels the model cannot embed (digits 0..9, null class 10)."""
    if class_labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"class labels must be integers, got dtype {class_labels.dtype}")
    if class_labels.ndim != 1:
        raise ValueError(f"class labels must be 1-D, got shape {tuple(class_labels.shape)}")
    if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > NULL_CLASS):
        raise ValueError(
            f"class labels must be digits 0..{NUM_CLASSES - 1} (or {NULL_CLASS}, the null class), "
            f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]"
        )
