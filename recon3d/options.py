"""Options with limits: the one place where a method's ranges live, read by the library, the CLI and the app.

A pipeline's options are a dataclass; a field with a :class:`Limit` (declared with :func:`limited`) is checked and
converted by :func:`check_limits`: a value from a form or a command line ("256", 256.0, None, NaN) becomes an
``int`` or ``float`` or is refused with one sentence that names the field, e.g. "mesh resolution must be between
64 and 512, got 600". Front ends read the same limits for their labels and sliders (:func:`limit_of`), so no
range is written twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Any, TypeVar

O = TypeVar("O", bound="Options")


@dataclass(frozen=True)
class Limit:
    """A number's allowed range (inclusive), whether it must be whole, and its name for people."""

    name: str  # e.g. "mesh resolution"
    low: float
    high: float
    whole: bool = False

    @property
    def text(self) -> str:
        """The range for a label: "64..512"."""
        return f"{self.low:g}..{self.high:g}" if not self.whole else f"{int(self.low)}..{int(self.high)}"

    def check(self, value: Any) -> int | float:
        """``value`` as a number in range (an int when whole), or ValueError with a one-line message."""
        if isinstance(value, bool):
            raise ValueError(f"{self.name} must be a number, got {value}")
        if self.whole and isinstance(value, (int, str)):  # exact, even beyond a float's 53 bits
            try:
                value = int(str(value).strip())
            except ValueError:
                pass
        if isinstance(value, int) and self.whole:
            if not self.low <= value <= self.high:
                raise ValueError(f"{self.name} must be between {self.text.replace('..', ' and ')}, got {value}")
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        if self.whole and not number.is_integer():
            raise ValueError(f"{self.name} must be a whole number, got {number:g}")
        if not self.low <= number <= self.high:
            shown = int(number) if self.whole else f"{number:g}"
            raise ValueError(f"{self.name} must be between {self.text.replace('..', ' and ')}, got {shown}")
        return int(number) if self.whole else number


def limited(default: Any, limit: Limit) -> Any:
    """A dataclass field whose values :func:`check_limits` checks against ``limit``.
    A field whose default is None may stay None ("resolved later", e.g. from the device); any other field must
    hold a number."""
    return dataclasses.field(default=default, metadata={"limit": limit})


def limit_of(options: type | object, name: str) -> Limit:
    """The :class:`Limit` of field ``name`` of an options class (or instance)."""
    for item in dataclasses.fields(options):
        if item.name == name and "limit" in item.metadata:
            return item.metadata["limit"]
    raise KeyError(f"{name} has no limit")


def check_limits(options: Any) -> None:
    """Check and convert, in place, every limited field of a dataclass instance (None stays None where it is
    the field's default)."""
    for item in dataclasses.fields(options):
        limit = item.metadata.get("limit")
        value = getattr(options, item.name)
        if limit is not None and not (value is None and item.default is None):
            object.__setattr__(options, item.name, limit.check(value))


DENOISING_STEPS = Limit("steps", 1, 200, whole=True)  # sampling steps of a diffusion model (DMV3D, a quick look)


class Options:
    """Base of the pipelines' options dataclasses: :meth:`validate` checks every limited field (and what a
    subclass adds); :meth:`resolved` fills the fields left None with the device's defaults
    (:meth:`device_defaults`), then validates: what a job on that device runs."""

    def device_defaults(self, device) -> dict[str, Any]:
        return {}

    def validate(self: O) -> O:
        check_limits(self)
        return self

    def resolved(self: O, device) -> O:
        defaults = {name: value for name, value in self.device_defaults(device).items() if getattr(self, name) is None}
        return replace(self, **defaults).validate()


__all__ = ["DENOISING_STEPS", "Limit", "Options", "check_limits", "limit_of", "limited"]
