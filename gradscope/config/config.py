"""The YAML config: pydantic models of its schema and ``load_config``.

Every model forbids unknown keys, so each error carries its key path; the
loader adds the file and line where the YAML gives them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gradscope.config.checks import Checks
from gradscope.config.config_base import Strict as _Strict
from gradscope.config.names import PROBE_NAMES
from gradscope.errors import ConfigError
from gradscope.report.memory import parse_bytes
from gradscope.utils import yamlfile

LOSS_NAMES = ("cross_entropy", "mse", "output")
LABEL_NAMES = ("input", "next_token")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Origin:
    """The file a config was read from, for resolving paths and locating errors."""

    base_dir: Path
    source: str | None = None
    lines: dict[str, int] = field(default_factory=dict)


from gradscope.config.checks import ClippingCheck, DriftCheck, IgnoreEntry  # noqa: E402,F401


class TargetSpec(_Strict):
    """A callable to build: ``path/to/file.py:attr`` or ``package.module:attr``, with keyword args."""

    target: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


class TokensSpec(_Strict):
    vocab: int = Field(gt=0)
    length: int = Field(gt=0)


class InputSpec(_Strict):
    """Synthetic inputs: float ``shape`` (per sample) ~ N(0, 1), or integer ``tokens``."""

    shape: list[int] | None = None
    tokens: TokensSpec | None = None

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or min(shape) <= 0):
            raise ValueError(f"expected a non-empty list of positive sizes, got {shape}")
        return shape

    @model_validator(mode="after")
    def _one_kind(self) -> InputSpec:
        if (self.shape is None) == (self.tokens is None):
            raise ValueError("give exactly one of `shape: [...]` or `tokens: {vocab, length}`")
        return self


class LabelSpec(_Strict):
    """Synthetic labels: class ids, regression targets, or derived from the inputs."""

    classes: int | None = Field(default=None, gt=0)
    shape: list[int] | None = None
    name: Literal["input", "next_token"] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> LabelSpec:
        given = [k for k in ("classes", "shape", "name") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give one of `{classes: N}`, `{shape: [...]}`, `input` or `next_token`")
        return self


class DataSpec(_Strict):
    """Either synthetic (``batch_size``, ``input``, ``labels``) or a factory (``target``, ``args``)."""

    batch_size: int | None = Field(default=None, gt=0)
    input: InputSpec | None = None
    labels: LabelSpec | None = None
    target: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in LABEL_NAMES:
                raise ValueError(f"expected `input`, `next_token`, {{classes: N}} or {{shape: [...]}}, got {value!r}")
            return {"name": value}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        synthetic = [k for k in ("batch_size", "input", "labels") if getattr(self, k) is not None]
        if self.target is not None and synthetic:
            raise ValueError(f"`target` builds the batch itself; drop {synthetic} (pass them in `args`)")
        if self.target is None and self.input is None:
            raise ValueError("give `input: {shape: [...]}` (synthetic data) or `target: file.py:make_batch`")
        if self.target is None and self.args:
            raise ValueError("`args` goes with `target`")
        return self

    @property
    def rows(self) -> int:
        return self.batch_size or 8


class LossSpec(_Strict):
    """A built-in loss by ``name`` or a user's ``target`` called as ``loss(output, labels)``."""

    name: Literal["cross_entropy", "mse", "output"] | None = None
    target: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> LossSpec:
        if (self.name is None) == (self.target is None):
            raise ValueError("give a loss name or `{target: file.py:fn}`")
        if self.name is not None and self.args:
            raise ValueError(
                f"the built-in `{self.name}` loss takes no `args` (got {list(self.args)}): use a loss target"
            )
        return self


class OptimizerSpec(BaseModel):
    """``name`` plus the optimizer's own keyword arguments (checked against its signature)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: Literal["sgd", "adam", "adamw"]
    lr: float = Field(default=1e-3, gt=0)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"lr": self.lr, **(self.model_extra or {})}


def _module_glob(pattern: str) -> str:
    """A module-name glob (fnmatch): a ``[`` with no ``]`` after it is read as a literal bracket,
    which no module name holds, so the pattern could never match."""
    if not pattern:
        raise ValueError("expected a module name or glob (blocks.*), got an empty string")
    i = pattern.find("[")
    while i != -1:
        close = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
        if close == -1:
            raise ValueError(f"{pattern!r} has a '[' that is never closed; a character set reads [0-3]")
        i = pattern.find("[", close + 1)
    return pattern


class CheckpointSpec(_Strict):
    modules: list[Annotated[str, AfterValidator(_module_glob)]] = Field(min_length=1)


class MemorySpec(_Strict):
    """The memory ledger (on by default) and its checkpointing advice."""

    ledger: bool = True  # what autograd saves for backward, per module, measured on the first step
    budget: int | None = None  # params + grads + optimizer state + saved activations must fit: 6GiB, 512MiB
    candidates: list[str] = Field(default_factory=list)  # modules to consider besides the repeated blocks
    flops: bool = True  # count the candidates' forward FLOPs (the recompute cost)

    @field_validator("budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_bytes(value)


class ClipSpec(_Strict):
    max_norm: float = Field(gt=0)
    norm_type: float = Field(default=2.0, allow_inf_nan=True)  # inf: the max-norm

    @field_validator("norm_type")
    @classmethod
    def _valid_norm(cls, value: float) -> float:
        if not (value >= 1 or math.isinf(value)):
            raise ValueError(f"expected a number >= 1 or inf, got {value}")
        return value


class DistributedSpec(_Strict):
    """Run under torchrun, one process per rank (``none``: a single process)."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"
    timeout_s: float = Field(default=600.0, gt=0)  # a collective waiting longer fails the run


class TensorBoardSpec(_Strict):
    logdir: str | None = None  # relative paths start at the current directory, as with --logdir
    histograms_every: int = Field(default=10, ge=0)  # gradient histograms every N steps (0: none)


def _known_probe(name: str) -> str:
    if name not in PROBE_NAMES:
        raise ValueError(f"unknown probe; expected one of: {', '.join(sorted(PROBE_NAMES))}, got {name!r}")
    return name


class Settings(_Strict):
    """A whole gradscope config."""

    seed: int = Field(default=0, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    device: str = "auto"
    model: TargetSpec
    data: DataSpec
    loss: LossSpec = LossSpec(name="cross_entropy")
    steps: int = Field(default=3, gt=0)
    every: int = Field(default=1, gt=0)  # measure every N-th step only
    optimizer: OptimizerSpec | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    scaler: bool | None = None  # fp16's GradScaler (on unless false); also `precision: {dtype: fp16, scaler: false}`
    checkpointing: CheckpointSpec | None = None
    memory: MemorySpec = MemorySpec()
    clip: ClipSpec | None = None
    checks: Checks = Checks()
    tensorboard: TensorBoardSpec = TensorBoardSpec()
    gradcheck: bool = False  # check custom autograd.Functions' backward against finite differences
    distributed: DistributedSpec = DistributedSpec()
    probes: list[Annotated[str, AfterValidator(_known_probe)]] = Field(
        default_factory=list
    )  # see config.names.PROBE_NAMES
    _origin: Origin = PrivateAttr(default_factory=lambda: Origin(Path.cwd()))

    @property
    def origin(self) -> Origin:
        """Where the config came from: relative targets resolve against ``origin.base_dir``."""
        return self._origin

    @model_validator(mode="before")
    @classmethod
    def _precision_table(cls, data: Any) -> Any:
        """``precision: {dtype: fp16, scaler: false}`` is ``precision: fp16`` beside ``scaler: false``."""
        if not isinstance(data, dict) or not isinstance(data.get("precision"), dict):
            return data
        table = data["precision"]
        unknown = sorted(str(k) for k in set(table) - {"dtype", "scaler"})
        if unknown:
            raise ValueError(f"precision.{unknown[0]}: unknown key; expected one of: dtype, scaler, got {unknown[0]!r}")
        if "scaler" in table and "scaler" in data:
            raise ValueError("scaler: give it once, in `precision:` or beside it, got both")
        out = {**data, "precision": table.get("dtype", "fp32")}
        if "scaler" in table:
            out["scaler"] = table["scaler"]
        return out

    @model_validator(mode="after")
    def _scaler_with_fp16(self) -> Settings:
        if self.scaler and self.precision != "fp16":
            raise ValueError(f"scaler: a grad scaler goes with precision fp16, got precision {self.precision}")
        return self

    @property
    def uses_scaler(self) -> bool:
        """fp16 with a GradScaler (the default; ``scaler: false`` turns it off)."""
        return self.precision == "fp16" and self.scaler is not False

    @field_validator("probes")
    @classmethod
    def _each_probe_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"each probe once, got {names}")
        return names

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in LOSS_NAMES:
                raise ValueError(f"expected one of {', '.join(LOSS_NAMES)} or {{target: file.py:fn}}, got {value!r}")
            return {"name": value}
        return value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a YAML config.

    Args:
        path: the YAML file (UTF-8, or UTF-16/32 with a byte-order mark); relative targets in it
            resolve against its folder.
        overrides: keys that replace the file's (e.g. from the CLI); a mapping merges into the
            file's mapping of the same key, so ``{"checks": {"dead_relu": {"fraction": 0.3}}}``
            keeps the file's other checks.

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid config.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([("", f"cannot read config file: {exc.strerror or exc}")], str(path)) from None
    raw, lines = yamlfile.parse(yamlfile.decode(data, str(path)), str(path))
    return settings_from_dict(merge(raw, overrides or {}), Origin(path.resolve().parent, str(path), lines))


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def settings_from_dict(raw: dict[str, Any], origin: Origin | None = None) -> Settings:
    """Validate a config given as a dict (what ``yaml.safe_load`` returns)."""
    origin = origin or Origin(Path.cwd())
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems = [(key_path(err["loc"]), _describe(err)) for err in exc.errors()]
        raise ConfigError(problems, origin.source, origin.lines) from None
    settings._origin = origin
    return settings


def key_path(loc: tuple[Any, ...]) -> str:
    """``('data', 'input', 'shape', 0)`` -> ``data.input.shape[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"unknown key; expected one of: {', '.join(allowed)}" if allowed else "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if "got" in msg:
        return msg
    return f"{msg}, got {err.get('input')!r}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at ``loc`` (for 'unknown key' messages)."""
    cls: Any = Settings
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        cls = next((a for a in (field.annotation, *get_args(field.annotation)) if _is_model(a)), None)
        if cls is None:
            return []
    return list(cls.model_fields)


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)
