"""Real libraries' models (random weights, nothing downloaded) set up as their recipes run them, and
faulty variants of them ported from bug reports; named by config targets (``<this file>:name``)."""

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB, LENGTH = 64, 8


def tokens(batch_size: int = 2) -> dict:
    """The ``data:`` section for these language models: token ids, labels = inputs (HF shifts them)."""
    return {"batch_size": batch_size, "input": {"tokens": {"vocab": VOCAB, "length": LENGTH}}, "labels": "input"}


def gpt2(checkpointing: str = "none") -> nn.Module:
    """A 2-layer GPT-2 from ``GPT2Config``; ``checkpointing``: ``none``, ``reentrant`` or ``non_reentrant``
    (Hugging Face's ``gradient_checkpointing_enable``)."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return _checkpointed(GPT2LMHeadModel(config), checkpointing)


def llama(checkpointing: str = "none") -> nn.Module:
    """A 2-layer Llama from ``LlamaConfig``; ``checkpointing`` as for ``gpt2``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _checkpointed(LlamaForCausalLM(config), checkpointing)


def _checkpointed(model: nn.Module, checkpointing: str) -> nn.Module:
    if checkpointing != "none":
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    return model.train()


class SqrtGate(nn.Module):
    """``where(x > 0, sqrt(x), 0)``: finite forward, NaN gradient where x < 0 (``sqrt``'s backward
    divides by ``sqrt(x)``, ``where`` multiplies the unselected side by 0: ``0 * inf``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


def gpt2_sqrt_gate(checkpointing: str = "reentrant") -> nn.Module:
    """GPT-2 whose second block's MLP activation is a ``SqrtGate`` (pytorch/pytorch#68425, #36923:
    ``torch.where`` backpropagates NaN from the branch it did not take)."""
    model = gpt2(checkpointing)
    model.transformer.h[1].mlp.act = SqrtGate()
    return model


def compiled_gpt2_sqrt_gate() -> nn.Module:
    """The same fault in a ``torch.compile``d GPT-2 (``eager`` backend: no C++ compiler needed)."""
    return torch.compile(gpt2_sqrt_gate("none"), backend="eager")


class NeedsAutocast(nn.Module):
    """A model written for autocast only: it refuses to run without it (as code that asserts a
    half-precision dtype does), so an fp32 replay of its step cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            raise RuntimeError("this model runs under autocast only")
        return self.out(torch.relu(self.inp(x)))


def t5(overflow: float = 1.0) -> nn.Module:
    """A 2+2-layer T5 from ``T5Config``. ``overflow`` scales the last decoder block's
    ``DenseReluDense.wo`` weight, whose output then overflows fp16's 65504 (huggingface/transformers#5651:
    "T5 fp16 overflow in forward (T5DenseReluDense)", at ``h = self.wo(h)``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.decoder.block[1].layer[2].DenseReluDense.wo.weight.mul_(overflow)
    return model.train()


class DiscardedInfs(nn.Module):
    """Makes Infs and throws each away (selected away by ``torch.where``, clamped, cast to an integer
    bucket as T5's relative positions are, masked), then overflows for real in ``out``."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)
        with torch.no_grad():
            # Finite weights whose products overflow float32. Positive, on inputs at or above 0 (the
            # relu below): every product is >= 0, so the sum overflows to +inf in any order a BLAS
            # kernel adds it in; with both signs it may meet -inf first and make NaN.
            self.out.weight.abs_().mul_(1e38)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) * 10
        h = h + torch.where(h > 0, torch.log(h.relu()), torch.zeros_like(h))  # log(0) = -inf, not selected
        h = h + torch.exp(h * 100).clamp(max=1.0)  # exp overflows, clamped back
        h = h + torch.exp(h * 100).long().clamp(0, 3).float()  # Inf cast to an integer bucket
        h = h + torch.exp(h * 100).masked_fill(h > -1, 0.0)  # Inf masked to 0
        return self.out(h.relu())


def log_of_softmax_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A hand-written cross-entropy, ``log(softmax(x))`` in two steps: a probability that underflows
    to 0 gives ``log(0) = -inf`` (``F.log_softmax`` does not)."""
    probs = torch.softmax(output * 1e3, dim=-1)
    picked = probs.gather(-1, labels[:, None]).squeeze(-1)
    return -torch.log(picked).mean()


def pairwise_distance_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus a spread term, the mean Euclidean distance between the batch's outputs as
    ``sqrt(sum(diff ** 2))``: each row's distance to itself is 0, where the gradient is ``0 * inf``,
    NaN (tilman151/rul-adapt#22: "Gradient of euclidean distance is not defined for a distance of zero")."""
    diff = output[:, None, :] - output[None, :, :]
    distance = diff.pow(2).sum(-1).sqrt()
    return torch.nn.functional.cross_entropy(output, labels) - 0.1 * distance.mean()


class ResidualBlock(nn.Module):
    """``out += x`` on a ReLU's output, which ReLU's backward needs (iMED-Lab/ER-Net#3, pytorch/vision#807:
    "replace out+=residual with out=out+residual")."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += x  # fault: changes the ReLU's saved output
        return out


class InplaceResidual(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def inplace_sigmoid_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A loss that rescales a sigmoid's output in place, which the sigmoid's backward needs."""
    probs = torch.sigmoid(output)
    probs.mul_(2)
    return torch.nn.functional.nll_loss(probs.log(), labels)


def tiny_loss(output, labels: torch.Tensor, scale: float = 1e-6) -> torch.Tensor:
    """A language model's next-token cross-entropy times ``scale`` (as a sum divided by a count far
    too large would be): at 1e-6 its gradients fall below fp16's smallest subnormal, 6e-8, at 1e-40
    below bf16's, 9e-41; fp32 keeps both (the second as subnormals)."""
    logits = output.logits[:, :-1].flatten(0, 1).float()
    return nn.functional.cross_entropy(logits, labels[:, 1:].flatten()) * scale
