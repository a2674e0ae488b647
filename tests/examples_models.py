"""Models and loops as pytorch/examples writes them, for the findings their recipes must not get.

``RNNModel`` is word_language_model/model.py's LSTM language model (encoder, dropout, LSTM,
decoder; encoder and decoder drawn from U(-0.1, 0.1), decoder bias zero), trained as its main.py
trains it: SGD at lr 20 on the gradients clipped to norm 0.25. ``WordLM`` is the same model with
batch-first token ids in and logits out, for a config. ``markov_tokens`` is text a language model
can learn: each token is a fixed function of the one before, with some noise.
"""

from __future__ import annotations

import torch
from torch import nn


class RNNModel(nn.Module):
    """word_language_model's ``RNNModel('LSTM', ntoken, ninp, nhid, nlayers, dropout)``."""

    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return torch.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)


class WordLM(RNNModel):
    """``RNNModel`` taking batch-first token ids and returning (batch, time, vocab) logits."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        log_probs, _ = super().forward(input.t(), self.init_hidden(input.shape[0]))
        return log_probs.view(input.shape[1], input.shape[0], -1).transpose(0, 1)


def markov_tokens(vocab: int, length: int, seed: int = 0, noise: float = 0.1) -> torch.Tensor:
    """A 1-D stream of ``length`` token ids: mostly ``(7 * previous + 3) % vocab``, else random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(length, dtype=torch.long)
    out[0] = 0
    jumps = torch.rand(length, generator=g) < noise
    random = torch.randint(vocab, (length,), generator=g)
    for i in range(1, length):
        out[i] = random[i] if jumps[i] else (7 * out[i - 1] + 3) % vocab
    return out


def word_lm_batch(batch: int, bptt: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-first inputs and next-token labels cut from ``markov_tokens``, for a config's ``data``."""
    stream = markov_tokens(vocab, batch * (bptt + 1), seed).view(batch, bptt + 1)
    return stream[:, :-1], stream[:, 1:]


class Policy(nn.Module):
    """reinforcement_learning/reinforce.py's policy (affine, activation, affine, softmax over actions),
    its activation written as ``where(h > 0, sqrt(h), -h)``: the gradient of sqrt at the negatives
    the where discards is NaN, so the first update writes NaN into ``affine1``."""

    def __init__(self, inputs: int = 32, hidden: int = 64, actions: int = 4) -> None:
        super().__init__()
        self.affine1 = nn.Linear(inputs, hidden)
        self.affine2 = nn.Linear(hidden, actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.affine1(x)
        h = torch.where(h > 0, torch.sqrt(h), -h)
        return torch.softmax(self.affine2(h), dim=-1)


def reinforce_loss(probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """reinforce.py's ``Categorical(probs)`` and the log-probability of the actions taken."""
    return -torch.distributions.Categorical(probs).log_prob(actions).mean()


class Whitened(nn.Module):
    """Features whitened by the eigenvectors of their covariance (``torch.linalg.eigh``), with a
    learned input gain and the same sqrt trap: once the gain is NaN, eigh cannot converge (LAPACK's
    solver for matrices of up to 25 rows says so; the divide-and-conquer one for larger returns NaN)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.inp = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x * self.gain)
        h = torch.where(h > 0, torch.sqrt(h), -h)
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(h.shape[1])  # (width, width)
        _, vecs = torch.linalg.eigh(cov)
        return self.head(h @ vecs)


class RaisesAtSecondCall(nn.Module):
    """A linear classifier whose second forward raises (a data-dependent bug), weights all finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("bad batch")
        return self.fc(x)
