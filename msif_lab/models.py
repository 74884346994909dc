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


# =====================================================================================================================
# Text: a mini-ELMo contextual embedding and its two heads. Taught in notebook 07_nlp_contextual_embeddings.
# Token ids come from msif_lab.text.encode: [B, L] long, <bos> ... <eos> then <pad> = 0.
# =====================================================================================================================
class GRUDirection(nn.Module):
    """One direction of a GRU over padded sequences: x [B, L, in], mask [B, L] bool -> hidden states [B, L, H].

    Written step by step with sigmoid/tanh (no cuDNN kernel), so it is twice differentiable and works under
    ``torch.func.grad``/``jvp``/``vmap``. The state is carried unchanged across padding and starts at zero at
    each sentence's first token (its last token when ``reverse``), so a sentence's states do not depend on the
    padding or on other sentences; states at padded positions are 0.
    """

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        bound = hidden ** -0.5
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, in_features).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden).uniform_(-bound, bound))
        self.hidden = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        gates_x = x @ self.weight_ih.T + self.bias_ih  # [B, L, 3H], all time steps at once
        h = x.new_zeros(x.shape[0], self.hidden)
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        states: list[torch.Tensor] = [h] * x.shape[1]
        for t in steps:
            xr, xz, xn = gates_x[:, t].chunk(3, dim=-1)
            hr, hz, hn = (h @ self.weight_hh.T + self.bias_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
            m = mask[:, t, None]
            h = torch.where(m, h_new, h)
            states[t] = torch.where(m, h, torch.zeros_like(h))
        return torch.stack(states, dim=1)


class ConvDirection(nn.Module):
    """One direction of a windowed (causal) convolution over padded sequences: x [B, L, in], mask [B, L] bool ->
    states [B, L, H], ``tanh(Σ_k weight[:, :, k] · x[t ∓ k] + bias)``.

    The forward direction's state at t reads tokens t−window+1..t, the reverse direction's tokens t..t+window−1
    (only positions inside the sentence: padding is zeroed first), so a state never sees the token its language
    model predicts and does not depend on the padding. States at padded positions are 0. Written as windows
    (``unfold``) times the weight (``einsum``) rather than ``conv1d``: identical numbers, and about 3× faster under
    ``torch.func.vmap`` (dense Hessians), where ``conv1d`` falls back to a slow kernel.
    """

    def __init__(self, in_features: int, hidden: int, window: int = 3):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be ≥ 1 token, got {window}.")
        bound = (in_features * window) ** -0.5  # as nn.Conv1d
        self.weight = nn.Parameter(torch.empty(hidden, in_features, window).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        self.window = window

    def extra_repr(self) -> str:
        hidden, in_features, window = self.weight.shape
        return f"in_features={in_features}, hidden={hidden}, window={window}"

    def forward(self, x: torch.Tensor, mask: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        z = (x * m).transpose(1, 2)  # [B, in, L]
        z = nn.functional.pad(z, (0, self.window - 1) if reverse else (self.window - 1, 0))
        windows = z.unfold(2, self.window, 1)  # [B, in, L, window]: position t reads z[t .. t + window − 1]
        return torch.tanh(torch.einsum("bilk,hik->blh", windows, self.weight) + self.bias) * m


class MiniELMo(nn.Module):
    """The contextual embedding W: token ids [B, L] -> features [B, L, 2·hidden].

    A word embedding (``dim``) read by a forward and a backward encoder (``hidden`` each); features are
    ``[forward state | backward state]`` per token (``out_features = 2·hidden``), 0 at padding. The forward state
    at t has read tokens ≤ t, the backward state tokens ≥ t: ELMo's two directional language models, with
    ``encoder="gru"`` (one GRU layer per direction: the whole sentence so far, as ELMo's LSTMs) or
    ``encoder="conv"`` (a convolution over the last/next ``window`` tokens: a shorter context, but 3–5× cheaper
    Hessian-vector products, which is what lets notebook 07 use exact Hessians on a CPU).

    The encoders read ``tanh`` of the word vectors. Without it the model has an exact symmetry: rotating every
    word vector by an orthogonal Q and the encoders' input weights by Qᵀ changes neither the outputs nor the weight
    decay, so the training objective is flat along d(d−1)/2 directions, its Hessian is singular at every optimum
    and Newton-type refits stall. The element-wise tanh breaks the rotation (notebook 07 shows the spectrum).
    """

    ENCODERS = ("gru", "conv")

    def __init__(self, vocab_size: int, dim: int = 32, hidden: int = 32, pad_id: int = 0, *, encoder: str = "gru",
                 window: int = 3):
        super().__init__()
        if encoder not in self.ENCODERS:
            raise ValueError(f"encoder must be one of {self.ENCODERS}, got {encoder!r}.")
        self.word = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.word.weight, std=0.1)
        make = (lambda: GRUDirection(dim, hidden)) if encoder == "gru" else (lambda: ConvDirection(dim, hidden, window))
        self.fwd = make()
        self.bwd = make()
        self.pad_id = pad_id
        self.hidden = hidden
        self.encoder = encoder
        self.out_features = 2 * hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"MiniELMo expects token ids [B, L] of dtype long, got {tuple(ids.shape)} {ids.dtype}. "
                             "Fix: use msif_lab.text.encode.")
        mask = ids != self.pad_id
        x = torch.tanh(self.word(ids))
        return torch.cat([self.fwd(x, mask), self.bwd(x, mask, reverse=True)], dim=-1)


class BiLMHead(nn.Module):
    """Pretraining head U: features [B, L, 2H] (, mask) -> logits [B, L, 2, V].

    ``[:, t, 0]`` predicts token t+1 from the forward state, ``[:, t, 1]`` token t−1 from the backward state;
    one softmax layer shared by both directions, as in ELMo. Loss: :func:`msif_lab.text.lm_loss`.
    """

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.out = nn.Linear(hidden, vocab_size)
        self.hidden = hidden

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fwd, bwd = features[..., :self.hidden], features[..., self.hidden:]
        return torch.stack([self.out(fwd), self.out(bwd)], dim=2)


class SentimentHead(nn.Module):
    """Finetuning head Θ: features [B, L, D], mask [B, L] -> logits [B, n_classes].

    Mean of the features over the sentence's tokens (``<bos>``/``<eos>`` included, padding excluded), then a
    linear layer. Loss: :func:`msif_lab.text.sentiment_loss`.
    """

    def __init__(self, in_features: int, n_classes: int = 2):
        super().__init__()
        self.out = nn.Linear(in_features, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(features.dtype)
        return self.out((features * m).sum(1) / m.sum(1).clamp(min=1))


class TextModel(nn.Module):
    """``head(embed(ids), ids != pad)``: ids [B, L] -> the head's outputs. Sub-modules ``embed`` and ``head``,
    so the pretraining (head = :class:`BiLMHead`) and finetuning (head = :class:`SentimentHead`) models share W."""

    def __init__(self, embed: MiniELMo, head: nn.Module):
        super().__init__()
        self.embed = embed
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids), ids != self.embed.pad_id)
