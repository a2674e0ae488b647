"""Build what a config describes: the device, the model, a batch and the loss function."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradscope.config import DataSpec, LossSpec, Settings
from gradscope.errors import ConfigError
from gradscope.runner import targets

Inputs = torch.Tensor | tuple[Any, ...] | dict[str, Any]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` go to the model (tensor, positional tuple or keyword dict)."""

    inputs: Inputs
    labels: Any = None

    def to(self, device: torch.device) -> Batch:
        return Batch(_to(self.inputs, device), _to(self.labels, device))

    def describe(self) -> str:
        """Shapes, for messages: ``inputs (32, 64) float32, labels (32,) int64``."""
        return f"inputs {_shapes(self.inputs)}, labels {_shapes(self.labels)}"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([("device", f"CUDA is not available on this machine, got {name!r} (use auto or cpu)")])
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError([("device", f"this machine has {torch.cuda.device_count()} CUDA devices, got {name!r}")])
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError([("device", "MPS is not available on this machine, got 'mps' (use auto or cpu)")])
    return device


def build_model(settings: Settings) -> nn.Module:
    """Call ``model.target`` with ``model.args`` under the config's seed."""
    torch.manual_seed(settings.seed)  # the schema bounds the seed to what torch takes
    model = targets.build(settings.model, settings.origin.base_dir, "model", "building the model")
    if not isinstance(model, nn.Module):
        raise ConfigError([("model.target", f"expected it to return a torch.nn.Module, got {type(model).__name__}")])
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ConfigError(
            [
                (
                    "model.target",
                    f"{meta[0]} (and {len(meta) - 1} more) is on the meta device, with no values to run: "
                    "build the model on a real device, or to_empty() and initialise it in the factory",
                )
            ]
            if len(meta) > 1
            else [
                ("model.target", f"{meta[0]} is on the meta device, with no values to run: build it on a real device")
            ]
        )
    return model


def build_batch(settings: Settings) -> Batch:
    """Synthetic data from ``data.input``/``data.labels``, or the ``data.target`` factory's ``(inputs, labels)``."""
    spec = settings.data
    if spec.target is None:
        return synthetic_batch(spec, settings.seed)
    torch.manual_seed(settings.seed)
    made = targets.build(spec, settings.origin.base_dir, "data", "building the batch")
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ConfigError([("data.target", f"expected it to return (inputs, labels), got {type(made).__name__}")])
    inputs, labels = made
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, (torch.Tensor, tuple, dict)):
        raise ConfigError([("data.target", f"inputs must be a tensor, tuple or dict, got {type(inputs).__name__}")])
    return Batch(inputs, labels)


def synthetic_batch(spec: DataSpec, seed: int) -> Batch:
    """Inputs ~ N(0, 1) of ``input.shape`` (or random token ids) and labels as ``labels`` says."""
    gen = torch.Generator().manual_seed(seed)
    rows = spec.rows
    _check_size(spec)
    assert spec.input is not None  # the schema requires input when there is no target
    if spec.input.tokens is not None:
        tokens = spec.input.tokens
        inputs = torch.randint(tokens.vocab, (rows, tokens.length), generator=gen)
    else:
        inputs = torch.randn((rows, *(spec.input.shape or [])), generator=gen)
    return Batch(inputs, _labels(spec, inputs, gen))


def _check_size(spec: DataSpec) -> None:
    """Refuse a synthetic batch larger than this machine's memory before torch tries to allocate it."""
    assert spec.input is not None
    per_row = math.prod(spec.input.shape) if spec.input.shape else spec.input.tokens.length  # type: ignore[union-attr]
    if spec.labels is not None and spec.labels.shape is not None:
        per_row += math.prod(spec.labels.shape)
    needed = spec.rows * per_row * 8  # float32 inputs or int64 tokens, and a copy on the device
    available = _memory_bytes()
    if needed > available:
        key = "data.batch_size" if spec.batch_size and spec.batch_size * 8 > per_row else "data.input"
        raise ConfigError(
            [
                (
                    key,
                    f"a batch of {spec.rows} x {per_row} values needs ~{needed / 2**30:.3g} GiB; this machine has "
                    f"{available / 2**30:.3g} GiB",
                )
            ]
        )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 40


def _labels(spec: DataSpec, inputs: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    labels = spec.labels
    if labels is None:
        return None
    if labels.classes is not None:
        return torch.randint(labels.classes, (inputs.shape[0],), generator=gen)
    if labels.shape is not None:
        return torch.randn((inputs.shape[0], *labels.shape), generator=gen)
    if labels.name == "input":
        return inputs.clone()
    if inputs.is_floating_point() or inputs.ndim != 2:
        raise ConfigError([("data.labels", "`next_token` needs `input: {tokens: ...}`")])
    # Token t predicts token t+1; the last position has no target (-100 is ignored by cross_entropy).
    return torch.cat([inputs[:, 1:], torch.full_like(inputs[:, :1], -100)], dim=1)


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class NoUpdate(torch.optim.Optimizer):
    """The optimizer when none is configured: it leaves the weights alone, so every step
    measures the same weights (and a grad scaler still has an optimizer to unscale for)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - Optimizer's signature
        return None


def build_optimizer(settings: Settings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``optimizer.name`` with its keyword arguments, or ``NoUpdate`` when there is none."""
    if not params:
        raise ConfigError([("model", "the model has no trainable parameters (requires_grad=False everywhere)")])
    spec = settings.optimizer
    if spec is None:
        return NoUpdate(params)
    cls = OPTIMIZERS[spec.name]
    allowed = [name for name in inspect.signature(cls).parameters if name != "params"]
    for key in spec.kwargs:
        if key not in allowed:
            raise ConfigError(
                [(f"optimizer.{key}", f"{cls.__name__} takes no {key!r}; expected one of: {', '.join(allowed)}")]
            )
    kwargs = {key: _optimizer_value(cls, key, value) for key, value in spec.kwargs.items()}
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        key = next((k for k in kwargs if _mentions(str(exc), k)), None)
        raise ConfigError([(f"optimizer.{key}" if key else "optimizer", f"{cls.__name__} refused it: {exc}")]) from None


# torch's messages name the keyword in words: "Invalid learning rate", "Invalid epsilon value", "beta".
_SPELLED = {"lr": "learning rate", "eps": "epsilon", "betas": "beta", "weight_decay": "weight_decay"}


def _mentions(message: str, key: str) -> bool:
    return key in message or _SPELLED.get(key, key) in message.lower()


def _optimizer_value(cls: type, key: str, value: Any) -> Any:
    """``value`` as the optimizer's own default says it should be: a finite number, a flag, or a
    tuple of numbers as long as the default (``betas``).

    Raises:
        ConfigError: a value of another type, or not finite (names ``optimizer.KEY``).
    """
    default = inspect.signature(cls).parameters[key].default
    where = f"optimizer.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError([(where, f"expected true or false, got {value!r}")])
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool) or key == "lr":
        return _finite(where, value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(
                [(where, f"expected a list of {len(default)} numbers like {list(default)}, got {value!r}")]
            )
        return tuple(_finite(f"{where}[{i}]", v) for i, v in enumerate(value))
    return value


def _finite(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (YAML reads it as text: write it as a plain number)" if isinstance(value, str) else ""
        raise ConfigError([(where, f"expected a number, got {value!r}{hint}")])
    if not math.isfinite(value):
        raise ConfigError([(where, f"expected a finite number, got {value!r}")])
    return value


def build_loss(settings: Settings) -> LossFn:
    """The loss as ``fn(output, labels) -> scalar``."""
    spec: LossSpec = settings.loss
    if spec.target is not None:
        fn = targets.resolve(spec.target, settings.origin.base_dir, "loss.target")
        return lambda output, labels: targets.call(fn, spec.args, "loss", "the loss function", output, labels)
    return {"cross_entropy": cross_entropy, "mse": mse, "output": loss_from_output}[spec.name]  # type: ignore[index]


def cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = primary_output(output)
    if logits.ndim > 2 and labels.ndim == logits.ndim - 1:
        # Sequence outputs (B, T, C) against labels (B, T): one prediction per position.
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return F.cross_entropy(logits, labels)


def mse(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(primary_output(output), labels)


def loss_from_output(output: Any, labels: Any) -> torch.Tensor:
    """The loss the model returned: a scalar tensor, ``output.loss`` or ``output['loss']``."""
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ConfigError(
            [
                (
                    "loss",
                    f"`output` expects the model to return the loss; it returned {type(output).__name__} with no `loss`",
                )
            ]
        )
    return loss


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a built-in loss reads: the output itself, ``.logits``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        [("loss", f"cannot find a tensor in the model's output ({type(output).__name__}); use a loss target")]
    )


def call_model(model: nn.Module, batch: Batch, pass_labels: bool) -> Any:
    """``model(inputs)``, spreading tuples and dicts; labels go in as ``labels=`` when asked."""
    extra = {"labels": batch.labels} if pass_labels and batch.labels is not None else {}
    if isinstance(batch.inputs, dict):
        return model(**{**extra, **batch.inputs})
    if isinstance(batch.inputs, tuple):
        return model(*batch.inputs, **extra)
    return model(batch.inputs, **extra)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _shapes(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items()) + "}"
    return type(value).__name__
