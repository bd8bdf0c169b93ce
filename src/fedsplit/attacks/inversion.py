"""Embedding inversion of the hidden states at cut 1: nearest neighbour and learned inverters.

* Nearest neighbour (the classic attack on a p = 0 split): each received vector is matched to the
  closest row of the embedding matrix (cosine or L2). Exact at p = 0; after a block the residual
  stream has moved away from the embeddings and plain nearest neighbour degrades.
* Learned inversion (SIP / BiSR's forward attack, arXiv 2409.00960): the attacker runs the head on
  PUBLIC text, fits a map from the cut's hidden states to tokens, and applies it to what it
  receives. :class:`RidgeInverter` is a least-squares map onto the embedding space followed by
  nearest neighbour; :class:`SoftmaxInverter` a linear (optionally + MLP) classifier over the
  vocabulary trained with cross-entropy, initialised from the ridge map.

All inverters take flat hidden states ``(N, H)`` of real (non-padding) positions and return token
ids ``(N,)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

Metric = Literal["cosine", "l2"]
METRICS: tuple[Metric, ...] = ("cosine", "l2")


class Inverter(Protocol):
    """Maps hidden states ``(N, H)`` at the cut to token ids ``(N,)``."""

    def predict(self, hidden: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def nearest_tokens(
    vectors: torch.Tensor, embedding: torch.Tensor, metric: Metric = "cosine", chunk: int = 256
) -> torch.Tensor:
    """Index of the nearest embedding row for each vector: ``(N, D), (V, D) -> (N,)``, in chunks of N."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if vectors.shape[-1] != embedding.shape[-1]:
        raise ValueError(f"vectors: expected last dimension {embedding.shape[-1]}, got {tuple(vectors.shape)}")
    table = embedding.float()
    if metric == "cosine":
        table = F.normalize(table, dim=-1)
    sq_norms = table.pow(2).sum(-1)  # (V,)
    out = []
    for start in range(0, vectors.shape[0], chunk):
        block = vectors[start : start + chunk].float()  # (n, D)
        if metric == "cosine":
            out.append((F.normalize(block, dim=-1) @ table.T).argmax(-1))  # (n,)
        else:  # argmin |v - e|^2 = argmin |e|^2 - 2 v.e
            out.append((sq_norms - 2.0 * block @ table.T).argmin(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def token_recovery(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Share of positions whose token was recovered exactly."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted: expected shape {tuple(target.shape)}, got {tuple(predicted.shape)}")
    return float((predicted == target).float().mean()) if target.numel() else 0.0


@dataclass
class NearestNeighbourInverter:
    """No training: the received vector itself is searched in the embedding matrix."""

    embedding: torch.Tensor  # (V, H)
    metric: Metric = "cosine"

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return nearest_tokens(hidden, self.embedding, self.metric)


def _with_bias(hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden.double(), hidden.new_ones(hidden.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, H+1)


@dataclass
class RidgeInverter:
    """Least squares from the cut's hidden states onto the embedding space, then nearest neighbour."""

    weight: torch.Tensor  # (H + 1, D): [h, 1] @ weight ~ embedding of the token
    embedding: torch.Tensor  # (V, D)
    metric: Metric = "cosine"

    @classmethod
    def fit(
        cls,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        embedding: torch.Tensor,
        *,
        ridge: float = 1e-3,
        validation: float = 0.1,
    ) -> RidgeInverter:
        """Closed-form ridge fit on ``(N, H)`` hidden states of public text and their tokens ``(N,)``.

        ``ridge`` is relative to the mean diagonal of X^T X (scale-free). The decoding metric is
        chosen on a held-out ``validation`` share of the public positions, never on private data.
        """
        if hidden.ndim != 2 or tokens.shape != hidden.shape[:1]:
            raise ValueError(
                f"hidden/tokens: expected (N, H) and (N,), got {tuple(hidden.shape)} and {tuple(tokens.shape)}"
            )
        n_val = min(int(hidden.shape[0] * validation), 500) if hidden.shape[0] >= 20 else 0
        fit_h, fit_t = hidden[n_val:], tokens[n_val:]
        x = _with_bias(fit_h)  # (N, H+1) float64
        gram = x.T @ x  # (H+1, H+1)
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        weight = torch.linalg.solve(gram, x.T @ embedding[fit_t].double()).float()  # (H+1, D)
        inverter = cls(weight, embedding.detach().float())
        if n_val:
            scores = {
                m: token_recovery(cls(weight, inverter.embedding, m).predict(hidden[:n_val]), tokens[:n_val])
                for m in METRICS
            }
            inverter.metric = max(scores, key=lambda m: scores[m])
        return inverter

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return (_with_bias(hidden) @ self.weight.double()).float()  # (N, D)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return nearest_tokens(self.project(hidden), self.embedding, self.metric)

    def save(self, path: Path | str) -> None:
        """Tensors only (safetensors); the metric in the metadata. Never pickle."""
        from safetensors.torch import save_file

        save_file(
            {"weight": self.weight.contiguous(), "embedding": self.embedding.contiguous()},
            str(path),
            metadata={"metric": self.metric},
        )

    @classmethod
    def load(cls, path: Path | str) -> RidgeInverter:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metric = (f.metadata() or {}).get("metric", "cosine")
            if metric not in METRICS:
                raise ValueError(f"{path}: metric: expected one of {METRICS}, got {metric!r}")
            return cls(f.get_tensor("weight"), f.get_tensor("embedding"), metric)  # type: ignore[arg-type]


class SoftmaxInverter(torch.nn.Module):
    """A classifier over the vocabulary: logits = s * (proj(h) . e_v / |e_v|) + b_v, trained with cross-entropy.

    ``proj`` starts as the ridge map (so training can only improve on it); ``hidden_units > 0`` adds a
    residual MLP. Trained on public positions in mini-batches; each step scores the whole vocabulary.
    """

    def __init__(self, ridge: RidgeInverter, hidden_units: int = 0) -> None:
        super().__init__()
        h_plus_1, d = ridge.weight.shape
        self.linear = torch.nn.Linear(h_plus_1 - 1, d)
        with torch.no_grad():
            self.linear.weight.copy_(ridge.weight[:-1].T)
            self.linear.bias.copy_(ridge.weight[-1])
        self.mlp = (
            torch.nn.Sequential(
                torch.nn.Linear(h_plus_1 - 1, hidden_units), torch.nn.GELU(), torch.nn.Linear(hidden_units, d)
            )
            if hidden_units
            else None
        )
        if self.mlp is not None:
            last: Any = self.mlp[2]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        self.table: torch.Tensor
        self.register_buffer("table", F.normalize(ridge.embedding.float(), dim=-1))  # (V, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(3.0))
        self.bias = torch.nn.Parameter(torch.zeros(ridge.embedding.shape[0]))

    def logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, V)`` scores, or ``(N, len(vocab))`` over a subset of token ids."""
        z = self.linear(hidden)  # (N, D)
        if self.mlp is not None:
            z = z + self.mlp(hidden)
        table, bias = (self.table, self.bias) if vocab is None else (self.table[vocab], self.bias[vocab])
        return self.log_scale.exp() * (F.normalize(z, dim=-1) @ table.T) + bias  # (N, V)

    def fit(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        *,
        steps: int = 200,
        batch_size: int = 256,
        lr: float = 5e-4,
        negatives: int = 4096,
        seed: int = 0,
        progress: bool = False,
    ) -> SoftmaxInverter:
        """Cross-entropy over the batch's tokens plus ``negatives`` random ones (sampled softmax), so a
        step costs ~``negatives`` instead of V columns; the full vocabulary when it is smaller."""
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)
        vocab_size = self.table.shape[0]
        self.train()
        for _ in tqdm(range(steps), desc="softmax inverter", unit="step", disable=not progress, leave=False):
            index = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),), generator=generator)
            if vocab_size <= 2 * negatives:
                loss = F.cross_entropy(self.logits(hidden[index].float()), tokens[index])
            else:
                sampled = torch.randint(0, vocab_size, (negatives,), generator=generator)
                vocab, target = torch.unique(torch.cat([tokens[index], sampled]), return_inverse=True)
                loss = F.cross_entropy(self.logits(hidden[index].float(), vocab), target[: index.numel()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.eval()
        return self

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        parts = [self.logits(hidden[i : i + chunk].float()).argmax(-1) for i in range(0, hidden.shape[0], chunk)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reconstruction_rouge_l(tokenizer, predicted: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> float:
    """Mean ROUGE-L F1 (``rouge-score`` package) of the decoded reconstructions against the decoded originals."""
    if len(predicted) != len(target):
        raise ValueError(f"predicted: expected {len(target)} sequences, got {len(predicted)}")
    scorer = _rouge_l_scorer()
    scores = [
        scorer.score(
            tokenizer.decode(list(t), skip_special_tokens=True), tokenizer.decode(list(p), skip_special_tokens=True)
        )["rougeL"].fmeasure
        for p, t in zip(predicted, target, strict=True)
    ]
    return sum(scores) / len(scores) if scores else 0.0
