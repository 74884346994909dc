"""Embeddings and heads used by the lessons.

Every model here is an ordinary ``torch.nn.Module``; the two-stage description in :mod:`msif_lab.stages`
says which sub-module is the shared embedding W and which is a head (U in pretraining, Θ in finetuning).
A pretraining model and a finetuning model share W by holding *the same embedding class under the same
sub-module name*, ``embed`` by convention, so their parameter names and shapes line up.

Taught in notebooks 02 (MLP), 03/04 (MLP embedding on MNIST) and 05 (small CNN on CIFAR-10).
"""
from __future__ import annotations

import torch
from torch import nn


class MLPEmbedding(nn.Module):
    """x [B, *in_shape] -> features [B, width]: flatten, then ``depth`` tanh layers.

    tanh (rather than ReLU) keeps the losses twice differentiable everywhere, which the influence
    calculus needs. Notebook 03 teaches it.
    """

    def __init__(self, in_features: int, width: int = 8, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """x [B, C, H, W] -> features [B, width]: two 3×3 conv blocks (tanh, 2×2 average pooling), then a linear layer.

    Smooth activations and average pooling keep the loss twice differentiable. No BatchNorm, so a
    per-example loss depends on that example alone. Notebook 05 teaches it.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: int = 8, width: int = 16):
        super().__init__()
        side = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(channels * side * side, width), nn.Tanh(),
        )
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingWithHead(nn.Module):
    """``head(embed(x))``: the shape of both the pretraining model (head = U) and the finetuning model (head = Θ).

    Sub-module names are ``embed`` and ``head``; use ``embedding="embed"`` in :class:`msif_lab.stages.Stage`.
    """

    def __init__(self, embed: nn.Module, head: nn.Module):
        super().__init__()
        self.embed = embed
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(*inputs))


def classifier(embed: nn.Module, n_classes: int) -> EmbeddingWithHead:
    """A linear classification head on top of ``embed`` (which must expose ``out_features``); logits [B, n_classes]."""
    return EmbeddingWithHead(embed, nn.Linear(embed.out_features, n_classes))
