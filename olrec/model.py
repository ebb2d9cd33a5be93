"""The ranking model, split into the sparse lookup and the dense tower.

The sparse part is rows of embedding tables (see :mod:`olrec.embedding`); each
row holds a ``dim``-vector plus one first-order weight. The dense tower below
takes the pooled rows of every field and the numeric inputs and returns a
logit. Serving runs only the dense tower (in Triton), so its forward takes
plain tensors:

    emb: (B, F, D + 1)  pooled rows per sparse field; [..., :D] vectors, [..., D] first-order weight
    num: (B, M)         raw numeric inputs (context numerics and counter features)
    ->   (B,)           logits
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

Arch = Literal["deepfm", "dcn"]


class Standardize(nn.Module):
    """Running mean/variance of the numeric inputs, learned from the stream
    (model state: a frozen model keeps the statistics it had). Columns keep
    their own counts, so a caller can update some columns before scoring a
    batch (inputs that carry no label) and the rest after."""

    PSEUDO = 64.0  # pseudo-events of unit variance: early batches (where a
    # feature can be constant, e.g. every count 0) must not divide by ~0

    def __init__(self, m: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(m))
        self.register_buffer("mean", torch.zeros(m))
        self.register_buffer("m2", torch.zeros(m))

    @torch.no_grad()
    def update(self, x: torch.Tensor, cols: slice = slice(None)) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x[:, cols]
        bmean = x.mean(0)
        bm2 = ((x - bmean) ** 2).sum(0)
        count, mean = self.count[cols], self.mean[cols]
        tot = count + n
        delta = bmean - mean
        self.mean[cols] = mean + delta * n / tot
        self.m2[cols] = self.m2[cols] + bm2 + delta**2 * count * n / tot
        self.count[cols] = tot

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The statistics as (count, sum, sum of squares), float64: additive, so
        workers merge what each learned by adding deltas."""
        n, mean, m2 = (b.double().cpu().numpy() for b in (self.count, self.mean, self.m2))
        return n, n * mean, m2 + n * mean * mean

    @torch.no_grad()
    def set_sums(self, n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
        mean = np.divide(s1, n, out=np.zeros_like(s1), where=n > 0)
        self.count.copy_(torch.from_numpy(n))
        self.mean.copy_(torch.from_numpy(mean))
        self.m2.copy_(torch.from_numpy(np.maximum(s2 - n * mean * mean, 0.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = (self.m2 + self.PSEUDO) / (self.count + self.PSEUDO)
        return (x - self.mean) / torch.sqrt(var)


def _mlp(d_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    layers.append(nn.Linear(d_in, 1))
    return nn.Sequential(*layers)


class DenseTower(nn.Module):
    """Over F sparse fields (dim D) and M numeric inputs: first-order weights, a
    fixed prior read, a linear read, a factorization machine over the sparse
    fields, an MLP, and with ``arch="dcn"`` a DCN-v2 cross network. Alone on
    MovieLens-100K DCN led slightly (0.7692 against 0.7681 progressive AUC);
    blended with the per-event wide part (:mod:`olrec.wide`) both give 0.7745,
    so the default is ``deepfm`` with one hidden layer of 32, about 20% faster."""

    def __init__(self, n_fields: int, dim: int, n_numeric: int, arch: Arch = "deepfm",
                 hidden: tuple[int, ...] = (64, 32), cross_layers: int = 2,
                 prior: torch.Tensor | None = None) -> None:
        super().__init__()
        # A linear read of the raw numeric inputs, initialised to a sensible
        # prior logit (the learner passes user rate + item rate - global rate),
        # so the model ranks well from the first batch and learns the rest.
        self.prior = nn.Linear(n_numeric, 1)
        nn.init.zeros_(self.prior.bias)
        with torch.no_grad():
            self.prior.weight.copy_(prior.reshape(1, -1) if prior is not None else torch.zeros(1, n_numeric))
        self.prior.requires_grad_(False)
        if arch not in ("deepfm", "dcn"):
            raise ValueError(f"unknown arch {arch!r}; use 'deepfm' or 'dcn'")
        self.arch, self.dim = arch, dim
        self.norm = Standardize(n_numeric)
        self.linear = nn.Linear(n_numeric, 1)
        d_flat = n_fields * dim + n_numeric
        self.deep = _mlp(d_flat, hidden)
        if arch == "dcn":
            self.cross = nn.ModuleList(nn.Linear(d_flat, d_flat) for _ in range(cross_layers))
            for layer in self.cross:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.cross_out = nn.Linear(d_flat, 1)

    def forward(self, emb: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        v, w = emb[..., : self.dim], emb[..., self.dim]
        x = self.norm(num)
        flat = torch.cat([v.flatten(1), x], 1)
        logit = w.sum(1) + self.prior(num).squeeze(1) + self.linear(x).squeeze(1) + self.deep(flat).squeeze(1)
        # The factorization machine over the sparse fields: explicit
        # user-item (and field-pair) products, which CF needs and an MLP or a
        # cross network learns only slowly. Numeric inputs stay out: vectors
        # for them slowed the user and item vectors on a synthetic MF world.
        s = v.sum(1)
        logit = logit + 0.5 * (s * s - (v * v).sum(1)).sum(1)
        if self.arch == "dcn":
            xl = flat
            for layer in self.cross:
                xl = flat * layer(xl) + xl
            logit = logit + self.cross_out(xl).squeeze(1)
        return logit
