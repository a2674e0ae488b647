"""The ``checks:`` section of the config: each anomaly rule's thresholds and severity, and the
findings to accept (``ignore``)."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from gradscope.config.config_base import Strict as _Strict
from gradscope.errors import ConfigError

Severity = Literal["error", "warning", "info", "off"]


class _Check(_Strict):
    severity: Severity | None = None  # None: the rule's own default

    @field_validator("severity", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 (and so yaml.safe_load) reads a bare `off` as False.
        return "off" if value is False else value


class VanishingCheck(_Check):
    ratio: float = Field(default=1e-4, gt=0, lt=1)  # earliest/latest relative gradient below this
    negligible: float = Field(default=1e-10, gt=0)  # every layer's relative gradient below this


class ExplodingCheck(_Check):
    ratio: float = Field(default=1e4, gt=1)  # earliest/latest relative gradient above this
    relative: float = Field(default=1e2, gt=0)  # a layer's |grad| / |weight| above this


class FractionCheck(_Check):
    fraction: float = Field(default=0.5, gt=0, le=1)
    min_samples: int = Field(default=16, gt=0)  # fewer samples per unit cannot tell dead from unlucky


class StepFractionCheck(_Check):
    fraction: float = Field(default=0.5, ge=0, le=1)  # of the steps


class ClippingCheck(StepFractionCheck):
    # Clipping that scales gradients by less than this is a warning; milder clipping is info.
    coefficient: float = Field(default=0.1, gt=0, le=1)


class UnderflowCheck(_Check):
    fraction: float = Field(default=0.05, gt=0, le=1)  # of a gradient's entries flushed to zero


class DriftCheck(_Check):
    factor: float = Field(default=10.0, gt=1)  # a layer's gradient norm moving more than this, either way


class SpikeCheck(_Check):
    """A step whose value stands far above the median of the steps before it (see rules/spikes.py)."""

    window: int = Field(default=128, ge=8)  # steps the median and spread are taken over (OLMo-core's 128)
    min_steps: int = Field(default=64, ge=4)  # no verdict before this many clean steps (the warm-up)
    threshold: float = Field(default=6.0, gt=0)  # robust standard deviations above the median
    factor: float = Field(default=2.0, ge=1)  # and at least this many times the median


class UpdateRatioCheck(_Check):
    """Weight matrices whose |delta w| / |w| per step stays above ``high`` (see rules/updates.py)."""

    high: float = Field(default=0.1, gt=0)  # 100x the ~1e-3 of a healthy learning rate
    fraction: float = Field(default=0.5, gt=0, le=1)  # of the judged steps
    # Steps with a ratio left out at the start: Adam's first updates are lr x sign(g) whatever the
    # gradient, and learning-rate schedules warm up.
    skip: int = Field(default=10, ge=0)
    min_steps: int = Field(default=3, ge=1)  # judged steps (after `skip`) before a verdict


class MemoryGrowthCheck(_Check):
    """A module whose saved-for-backward bytes grew from the baseline's (see rules/memory.py)."""

    factor: float = Field(default=1.1, gt=1)  # now / baseline above this
    min_bytes: int = Field(default=1 << 16, ge=0)  # growth smaller than this (64 KiB) is left alone


class IgnoreEntry(_Strict):
    """Accept a known finding: ``kind`` plus globs over the module and parameter names."""

    kind: str
    module: str = "*"
    parameter: str = "*"
    reason: str = Field(min_length=1)


class Checks(_Strict):
    """Thresholds of the anomaly rules, and findings to accept."""

    nonfinite_loss: _Check = _Check()
    nonfinite_forward: _Check = _Check()
    nonfinite_gradient: _Check = _Check()
    backward_error: _Check = _Check()
    vanishing_gradient: VanishingCheck = VanishingCheck()
    exploding_gradient: ExplodingCheck = ExplodingCheck()
    dead_relu: FractionCheck = FractionCheck()
    saturated_activation: FractionCheck = FractionCheck()
    unused_parameter: _Check = _Check()
    zero_gradient: _Check = _Check()
    expert_routing: _Check = _Check()
    gradient_clipping: ClippingCheck = ClippingCheck()
    loss_scale_overflow: StepFractionCheck = StepFractionCheck(fraction=0.25)
    gradient_underflow: UnderflowCheck = UnderflowCheck()
    wrong_gradient: _Check = _Check()
    stale_gradient: _Check = _Check()
    baseline_drift: DriftCheck = DriftCheck()
    rank_divergence: DriftCheck = DriftCheck()  # a rank's own gradient norm this far from the others'
    loss_spike: SpikeCheck = SpikeCheck()
    gradient_spike: SpikeCheck = SpikeCheck()
    update_ratio: UpdateRatioCheck = UpdateRatioCheck()
    memory_growth: MemoryGrowthCheck = MemoryGrowthCheck()
    memory_budget: _Check = _Check()
    # The loop around the gradients (gradscope.watch and the trainer callbacks).
    not_in_optimizer: _Check = _Check()
    no_update: StepFractionCheck = StepFractionCheck()  # warning above this fraction of the steps; error: all
    step_not_called: _Check = _Check()
    eval_mode: _Check = _Check()
    ignore: list[IgnoreEntry] = Field(default_factory=list)

    @field_validator("ignore")
    @classmethod
    def _known_kinds(cls, entries: list[IgnoreEntry]) -> list[IgnoreEntry]:
        kinds = [name for name in cls.model_fields if name != "ignore"]
        for entry in entries:
            if entry.kind not in kinds:
                raise ValueError(f"unknown kind {entry.kind!r}; expected one of: {', '.join(kinds)}")
        return entries

    def rule(self, kind: str) -> Any:
        """The thresholds of one rule."""
        return getattr(self, kind)


def parse_check_options(entries: list[str]) -> dict[str, dict[str, Any]]:
    """``--check KIND.KEY=VALUE`` options as a ``checks:`` mapping, each value read as YAML and
    validated on its own, so that an error names the option rather than a line of the file.

    Raises:
        ConfigError: a malformed option, an unknown kind or key, or a value the check refuses.
    """
    kinds = [name for name in Checks.model_fields if name != "ignore"]
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        kind, dot, name = key.partition(".")
        option = f"--check {entry}"
        if not (sep and dot and kind and name):
            raise ConfigError([("--check", f"expected KIND.KEY=VALUE (e.g. dead_relu.fraction=0.3), got {entry!r}")])
        if kind == "ignore":
            raise ConfigError(
                [(option, "--check sets thresholds; accept a finding with `checks: ignore:` in the config")]
            )
        if kind not in kinds:
            raise ConfigError([(option, f"unknown check {kind!r}; expected one of: {', '.join(kinds)}")])
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError([(option, f"the value is not valid YAML: {problem}")]) from None
        try:
            Checks.model_validate({kind: {name: value}})
        except ValidationError as exc:
            err = exc.errors()[0]
            message = err["msg"].removeprefix("Value error, ") + f", got {value!r}"
            if err["type"] == "extra_forbidden":
                fields = type(getattr(Checks(), kind)).model_fields
                message = f"{kind} has no {name!r}; expected one of: {', '.join(fields)}"
            raise ConfigError([(option, message)]) from None
        out.setdefault(kind, {})[name] = value
    return out
