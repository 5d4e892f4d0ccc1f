"""The attention contract: typed knobs, the base module, and the registry.

Every mechanism is one subclass of :class:`Attention` with a frozen dataclass of
knobs. The harness, the reports and the CLI only ever talk to this interface, so
none of them needs to know a mechanism by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import torch
from torch import nn

from attnbench.errors import AttnbenchError, UnknownName

HW = tuple[int, int]
# A token map of any rank: (H, W) for an image, (T, H, W) for a clip; tokens in row-major (t, h, w) order.
THW = tuple[int, ...]


class KnobError(AttnbenchError, ValueError):
    """A knob is unknown, of the wrong type or out of range."""


class UnsupportedPoint(AttnbenchError, ValueError):
    """A mechanism was asked to run at a point it declares it cannot run."""

    def __init__(self, name: str, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__(f"{name} cannot run here: " + "; ".join(self.reasons))


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class Requires:
    """What a mechanism, or one of its impls, needs to run: data that :func:`not_supported_reasons` reads.

    In the style of xformers' ``not_supported_reasons``: device types, dtypes and
    autograd are declared, not coded; ``probe`` asks the environment what a
    declaration cannot say (a library, a torch feature): device type -> reasons.
    ``fix`` ends every refusal these declarations give.
    """

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    backward: bool = True
    probe: Callable[[str], list[str]] | None = None
    fix: str = ""

    def reasons(self, what: str, dtype: Any, device: Any, grad: bool) -> list[str]:
        fix = f"; {self.fix}" if self.fix else ""
        out: list[str] = []
        kind = None if device is None else torch.device(device).type
        if kind is not None and kind != "meta" and kind not in self.devices:
            out.append(f"{what} runs on {' or '.join(self.devices)}, not {kind}{fix}")
        name = None if dtype is None else str(dtype).replace("torch.", "")
        if name is not None and name not in self.dtypes:
            *most, last = self.dtypes
            out.append(f"{what} takes {', '.join(most) + ' or ' if most else ''}{last}, not {name}{fix}")
        if grad and not self.backward:
            out.append(f"{what} has no backward pass{fix}")
        if self.probe is not None and not out:
            default = "cuda" if torch.cuda.is_available() else "cpu"
            out += self.probe(default if kind is None else kind)
        return out


@dataclasses.dataclass(frozen=True)
class TimeAxis:
    """Whether a mechanism takes (T, H, W) maps as well as (H, W): data that :meth:`Attention.unsupported` reads.

    ``how`` says what time means to the mechanism (tables, windows, pooling over t); ``why_not``
    is the reason a sweep records when it skips a (T, H, W) point of a mechanism that does not.
    """

    supported: bool = False
    how: str = ""
    why_not: str = "its maps are (H, W) only"

    def reasons(self, name: str, hw: tuple[int, ...]) -> list[str]:
        if len(hw) == 3 and not self.supported:
            return [f"{name} takes no time axis (a {'x'.join(map(str, hw))} map): {self.why_not}"]
        return []


def map_tokens(hw: tuple[int, ...]) -> int:
    """Tokens of a map of any rank: H*W or T*H*W."""
    n = 1
    for side in hw:
        n *= side
    return n


@dataclasses.dataclass(frozen=True)
class MapRule:
    """A constraint a token map must meet: H and W multiples of ``multiple``, each side in
    [``at_least``, ``at_most``]. ``what`` names the quantity (``the window 7``); ``fix`` says
    what to change. ``which`` is ``hw`` (the query map) or ``context_hw``."""

    what: str
    multiple: int = 1
    at_least: int = 1
    at_most: int | None = None
    fix: str = ""
    which: str = "hw"

    def reasons(self, name: str, hw: THW) -> list[str]:
        h, w = hw[-2:]  # the spatial sides of an (H, W) or (T, H, W) map
        where = f"{name}: {'the map' if self.which == 'hw' else 'the context map'} {h}x{w}"
        fix = f"; {self.fix}" if self.fix else ""
        if h % self.multiple or w % self.multiple:
            return [f"{where}: H and W must be multiples of {self.what}{fix}"]
        if min(h, w) < self.at_least:
            return [f"{where} is smaller than {self.what} in a dimension{fix}"]
        if self.at_most is not None and max(h, w) > self.at_most:
            return [f"{where} is larger than {self.what}{fix}"]
        return []

    def fits(self, hw: THW) -> bool:
        return not self.reasons("", hw)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Base of every mechanism's knob dataclass.

    Subclasses are ``@dataclass(frozen=True)`` with typed, defaulted fields and
    override :meth:`check` to raise :class:`KnobError` naming the fix.
    """

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise KnobError when a value is out of range."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# The base class under a second name: inside ``Attention`` the name ``Knobs`` is
# the class attribute holding each mechanism's own dataclass.
KnobsBase = Knobs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return f"tuple[{_type_name(args[0])}, ...]" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a Python value or a CLI string) to the annotated type."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise KnobError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        # Prefer the scalar reading of "8" and the tuple reading of "16,8,8".
        options = sorted(get_args(tp), key=lambda t: get_origin(t) is tuple)
        if isinstance(value, str) and "," in value:
            options = sorted(options, key=lambda t: get_origin(t) is not tuple)
        for option in options:
            try:
                return _coerce(value, option, where)
            except KnobError as exc:
                errors.append(str(exc))
        raise KnobError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        (item_type, *_rest) = get_args(tp)
        if isinstance(value, str):
            parts = [p for p in value.replace(" ", "").split(",") if p]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise KnobError(f"{where} must be {_type_name(tp)}, got {value!r}")
        if not parts:
            raise KnobError(f"{where} must not be empty")
        return tuple(_coerce(p, item_type, where) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise KnobError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise KnobError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise KnobError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise KnobError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise KnobError(f"{where} must be a string, got {value!r}")
    return value


class Attention(nn.Module):
    """Base class of every mechanism.

    ``forward(x, hw, context=None, context_hw=None)`` takes ``x`` of shape
    ``(B, prefix + H*W, dim)`` with the ``H*W`` tokens in row-major order and
    returns a tensor of the same shape (of ``prefix + prod(output_hw(hw))``
    tokens where a mechanism pools its queries, of ``output_dim`` channels
    where it widens them). Subclasses implement :meth:`_forward`,
    :meth:`macs` and, where points can be refused, :meth:`_unsupported`.
    """

    name: ClassVar[str]
    Knobs: ClassVar[type[KnobsBase]]
    summary: ClassVar[str] = ""
    # The knob that sets the mechanism's cost (None when only resolution does).
    cost_knob: ClassVar[str | None] = None
    # Big-O of time in the number of tokens N (for tables; the analytic count is exact).
    complexity: ClassVar[str] = ""
    supports_cross: ClassVar[bool] = False
    requires_context: ClassVar[bool] = False
    # Tokens that precede the H*W map (a CLS token, say).
    prefix_tokens: ClassVar[int] = 0
    # Whether (T, H, W) maps are taken, and why not where they are not (data, like ``requires``).
    time: ClassVar[TimeAxis] = TimeAxis()
    # Whether ``footprint`` draws (T, H, W) clips (a query (t, i, j), weights (heads, T, H, W)).
    clip_footprint: ClassVar[bool] = False
    # Implementations; "reference" is the plain PyTorch definition of correct.
    impls: ClassVar[tuple[str, ...]] = ("reference", "fast")
    default_impl: ClassVar[str] = "fast"
    # What the mechanism needs wherever it runs, and what each impl needs on top (impls not named: nothing).
    requires: ClassVar[Requires] = Requires()
    impl_requires: ClassVar[dict[str, Requires]] = {}
    # Knob sets that reach code paths one knob changed from its default does not (registry-driven tests).
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()
    # Parameters whose gradient is a small difference of large sums (e.g. softmax
    # weights over nearly equal messages): in low precision their relative error
    # measures that cancellation, so parity holds them to a looser, stated bound.
    cancelling_grads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, heads: int, knobs: KnobsBase, impl: str | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise KnobError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(heads, int) or heads <= 0:
            raise KnobError(f"heads must be a positive integer, got {heads!r}")
        reasons = self.static_reasons(dim, heads, knobs, impl)
        if reasons:
            raise KnobError("; ".join(reasons))
        self.dim = dim
        self.heads = heads
        self.knobs = knobs
        self.head_dim = self.attention_width(dim, knobs) // heads
        self._impl = self.default_impl
        self.impl = impl or self.default_impl
        # Points (impl, batch, maps, dtype, device) that passed unsupported() in _check_inputs: the verdict depends
        # on nothing else, so a forward asks it once per point, not on every call
        self._checked: set[tuple] = set()

    # ------------------------------------------------------------------ requirements
    @classmethod
    def attention_width(cls, dim: int, knobs: KnobsBase) -> int:
        """Channels the heads split: dim, or the widened width where a mechanism widens (pooling's dim_out)."""
        return dim

    @classmethod
    def static_reasons(cls, dim: int, heads: int, knobs: KnobsBase, impl: str | None = None) -> list[str]:
        """Why the module cannot be built with these widths, knobs and impl (empty when it can)."""
        reasons = []
        if impl is not None and impl not in cls.impls:
            reasons.append(f"impl {impl!r} is not one of {cls.name}'s implementations: {', '.join(cls.impls)}")
        width = cls.attention_width(dim, knobs)
        if width % heads:
            label = "dim" if width == dim else "output_dim"
            reasons.append(
                f"{label} ({width}) must be divisible by heads ({heads}); choose heads from {_divisors(width)}"
            )
        return reasons + cls._static_reasons(dim, heads, knobs)

    @classmethod
    def _static_reasons(cls, dim: int, heads: int, knobs: Any) -> list[str]:
        return []

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        """The constraints this module puts on the maps (as data; :meth:`unsupported` checks them)."""
        return []

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        """Knobs of this mechanism's blocks (cycled) at stage 1-4 of a four-stage backbone whose stage map
        is ``hw`` at its native resolution: the family's published per-stage settings, the defaults where
        it has none. A model fits them to the maps it runs at (:func:`fit_knobs`)."""
        return ({},)

    # ------------------------------------------------------------------ knobs
    @classmethod
    def knob_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls.Knobs)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls.Knobs)}

    @classmethod
    def knob_defaults(cls) -> dict[str, Any]:
        return cls.Knobs().as_dict()

    @classmethod
    def make_knobs(cls, **values: Any) -> KnobsBase:
        types_ = cls.knob_types()
        unknown = sorted(set(values) - set(types_))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in cls.knob_defaults().items()) or "(none)"
            raise KnobError(f"unknown knob(s) {', '.join(unknown)} for {cls.name}; valid knobs with defaults: {valid}")
        coerced = {k: _coerce(v, types_[k], f"{cls.name} knob {k!r}") for k, v in values.items()}
        return cls.Knobs(**coerced)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What `attnbench list` and the harness know of a mechanism."""
        types_ = cls.knob_types()
        return {
            "name": cls.name,
            "summary": cls.summary,
            "knobs": {
                k: {"default": _jsonable(v), "type": _type_name(types_[k])} for k, v in cls.knob_defaults().items()
            },
            "cost_knob": cls.cost_knob,
            "cross": "required" if cls.requires_context else ("yes" if cls.supports_cross else "no"),
            "complexity": cls.complexity,
            "impls": list(cls.impls),
            "prefix_tokens": cls.prefix_tokens,
            "time": cls.time.how if cls.time.supported else f"no: {cls.time.why_not}",
        }

    # ------------------------------------------------------------------ impl
    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in self.impls:
            raise KnobError(f"impl {value!r} is not one of {self.name}'s implementations: {', '.join(self.impls)}")
        self._impl = value

    @property
    def math(self) -> bool:
        """True on the plain reference path (no fused kernels)."""
        return self._impl == "reference"

    # ------------------------------------------------------------------ contract
    @property
    def context_dim(self) -> int:
        """Width of the context tokens in cross attention."""
        return self.dim

    @property
    def context_prefix_tokens(self) -> int:
        return self.prefix_tokens

    def default_context_hw(self, hw: HW) -> HW:
        return hw

    def tie_free_knobs(self, hw: HW, context_hw: HW | None = None) -> dict[str, Any] | None:
        """Knob overrides under which the mechanism makes no discrete choice.

        A top-K selection flips on near-ties when the scores are rounded, and a
        flipped selection is a different function, not a rounding error. Parity in
        low precision is checked under these overrides; None when the mechanism
        makes no such choice.
        """
        return None

    def output_hw(self, hw: HW) -> HW:
        """Token map of the output: ``hw`` unless the mechanism pools its queries."""
        return hw

    @property
    def output_dim(self) -> int:
        """Channels of the output tokens: ``dim`` unless the mechanism widens them (pooling's ``dim_out``)."""
        return self.dim

    def unsupported(
        self,
        batch: int,
        hw: HW,
        context_hw: HW | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        grad: bool = False,
    ) -> list[str]:
        """Human reasons why this point cannot run (empty when it can); see :func:`not_supported_reasons`.

        ``device`` None means wherever the module would run; ``grad`` asks for a backward pass too.
        """
        reasons: list[str] = []
        if batch < 1:
            reasons.append(f"batch must be at least 1, got {batch}")
        for label, value in (("hw", hw), ("context_hw", context_hw)):
            if value is None:
                continue
            if len(value) not in (2, 3) or any((not isinstance(v, int)) or v < 1 for v in value):
                reasons.append(f"{label} must be two or three positive integers, (H, W) or (T, H, W), got {value!r}")
        if reasons:
            return reasons
        reasons += self.time.reasons(self.name, hw)
        if context_hw is not None:
            reasons += self.time.reasons(self.name, context_hw)
        if reasons:
            return reasons
        if context_hw is not None and not self.supports_cross:
            return [f"{self.name} does not support cross attention"]
        if self.requires_context and context_hw is None:
            context_hw = self.default_context_hw(hw)
        reasons += _device_reasons(device)
        reasons += self.requires.reasons(self.name, dtype, device, grad)
        if self.impl in self.impl_requires:
            reasons += self.impl_requires[self.impl].reasons(f"impl={self.impl!r}", dtype, device, grad)
        for rule in self.map_rules(hw, context_hw):
            on = hw if rule.which == "hw" else context_hw
            if on is not None:
                reasons += rule.reasons(self.name, on)
        reasons += self._unsupported(batch, hw, context_hw, dtype=dtype, device=device)
        return reasons

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        """What the declared requirements and map rules cannot say (empty when nothing)."""
        return []

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        """Analytic multiply-adds of one forward call (see attentions/README)."""
        raise NotImplementedError

    def example_inputs(
        self,
        batch: int,
        hw: HW,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cross: bool = False,
        context_hw: HW | None = None,
        seed: int = 0,
    ) -> tuple:
        """Positional arguments for ``forward``: ``(x, hw)`` or ``(x, hw, context, context_hw)``."""
        if cross and not self.supports_cross:
            raise ValueError(f"{self.name} does not support cross attention")
        gen = torch.Generator().manual_seed(seed)
        # x: (B, prefix + [T*]H*W, C); q, k and v are projected from it, never aliased.
        x = torch.randn(batch, self.prefix_tokens + map_tokens(hw), self.dim, generator=gen)
        x = x.to(device=device, dtype=dtype)
        if not (cross or self.requires_context):
            return (x, hw)
        chw = context_hw or self.default_context_hw(hw)
        ctx = torch.randn(batch, self.context_prefix_tokens + map_tokens(chw), self.context_dim, generator=gen)
        return (x, hw, ctx.to(device=device, dtype=dtype), chw)

    def forward(
        self,
        x: torch.Tensor,
        hw: HW | None = None,
        context: torch.Tensor | None = None,
        context_hw: HW | None = None,
    ) -> torch.Tensor:
        hw, context_hw = self._check_inputs(x, hw, context, context_hw)
        out = self._forward(x, hw, context, context_hw)
        return out

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(
        self, x: torch.Tensor, hw: Any, context: torch.Tensor | None, context_hw: Any
    ) -> tuple[HW, HW | None]:
        if hw is None:
            raise ValueError(f"{self.name}: pass hw=(H, W) or (T, H, W), the token map size of x")
        hw = _as_hw(hw, "hw")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}: x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}; "
                "flatten a (B, C, H, W) map with x.flatten(2).transpose(1, 2)"
            )
        expected = self.prefix_tokens + map_tokens(hw)
        if x.shape[1] != expected:
            area = "T*H*W" if len(hw) == 3 else "H*W"
            raise ValueError(
                f"{self.name}: x has {x.shape[1]} tokens but hw={hw} needs {expected}"
                + (f" ({self.prefix_tokens} prefix + {area})" if self.prefix_tokens else f" ({area})")
            )
        if context is None:
            if self.requires_context:
                raise ValueError(f"{self.name}: needs context= (the other branch's tokens) and context_hw=")
            if context_hw is not None:
                raise ValueError(f"{self.name}: context_hw given without context")
        else:
            if not self.supports_cross:
                raise ValueError(f"{self.name} does not support cross attention; call it without context")
            if context_hw is None:
                raise ValueError(f"{self.name}: pass context_hw=(H, W) with context")
            context_hw = _as_hw(context_hw, "context_hw")
            want = self.context_prefix_tokens + map_tokens(context_hw)
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[1:] != (want, self.context_dim):
                raise ValueError(
                    f"{self.name}: context must have shape ({x.shape[0]}, {want}, {self.context_dim}) "
                    f"for context_hw={context_hw}, got {tuple(context.shape)}"
                )
        point = (self.impl, x.shape[0], hw, context_hw, x.dtype, x.device)
        if torch.compiler.is_compiling() or point not in self._checked:
            reasons = self.unsupported(x.shape[0], hw, context_hw, dtype=x.dtype, device=x.device)
            if reasons:
                raise UnsupportedPoint(self.name, reasons)
            if not torch.compiler.is_compiling():
                self._checked.add(point)
        return hw, context_hw

    def extra_repr(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.as_dict().items())
        return f"dim={self.dim}, heads={self.heads}, impl={self.impl}" + (f", {knobs}" if knobs else "")

    # ------------------------------------------------------------------ footprint
    def footprint(
        self,
        x: torch.Tensor,
        hw: HW,
        query: tuple[int, int],
        context: torch.Tensor | None = None,
        context_hw: HW | None = None,
    ) -> torch.Tensor:
        """For the query at pixel ``query = (i, j)`` of x's map, the weight each pixel of the key map
        (x's map, or context's in cross attention) receives, per head: ``(heads, Hk, Wk)``.

        Exact on the reference path (float32): the weights the mechanism gives the keys it reads,
        with a key made from several pixels spread over them (see attentions/footprint.py and each
        mechanism's ``_footprint``). ``x`` holds one image (batch 1). On a clip (``hw`` = (T, H, W)) the
        query is (t, i, j) and the result (heads, T, H, W), one map per frame; mechanisms declare whether
        they draw clips (``clip_footprint``).
        """
        from .footprint import check_query

        impl = self.impl
        try:
            self.impl = "reference"  # checked as it runs: a fast path that cannot run here does not matter
            hw, context_hw = self._check_inputs(x, hw, context, context_hw)
            if x.shape[0] != 1:
                raise ValueError(f"{self.name}: a footprint is of one image; pass x[:1] (got batch {x.shape[0]})")
            if len(hw) == 3 and not self.clip_footprint:
                raise NotImplementedError(f"{self.name} draws footprints of (H, W) maps only, not of clips")
            q = check_query(query, hw)
            with torch.no_grad():
                return self._footprint(x, hw, q, context, context_hw).float()
        finally:
            self.impl = impl

    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no footprint")

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        """Keys (tokens after any pooling, reduction or sampling) that one query's softmax runs over."""
        raise NotImplementedError(f"{self.name} does not count its keys per query")


def _as_hw(value: Any, label: str) -> Any:
    """(H, W) or (T, H, W) as a tuple of ints; anything else is refused naming both forms."""
    what = f"{label} must be (H, W) or (T, H, W), positive integers, got {value!r}"
    try:
        sides = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(what) from None
    if len(sides) not in (2, 3) or min(sides) < 1:
        raise ValueError(what)
    return sides


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Attention]] = {}


def register(cls: type[Attention]) -> type[Attention]:
    """Class decorator: add a mechanism to the registry under ``cls.name``."""
    if not dataclasses.is_dataclass(cls.Knobs) or not cls.Knobs.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}.Knobs must be a frozen dataclass")
    if cls.name in _REGISTRY:
        raise ValueError(f"mechanism {cls.name!r} registered twice")
    if cls.cost_knob is not None and cls.cost_knob not in cls.knob_types():
        raise TypeError(f"{cls.__name__}.cost_knob {cls.cost_knob!r} is not one of its knobs")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered mechanisms, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[Attention]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownName(f"unknown mechanism {name!r}; available: {', '.join(available())}") from None


def build(name: str, *, dim: int, heads: int, impl: str | None = None, **knobs: Any) -> Attention:
    """Build a registered mechanism: ``build("swin", dim=96, heads=3, window=7)``."""
    cls = get(name)
    return cls(dim=dim, heads=heads, knobs=cls.make_knobs(**knobs), impl=impl)


def _device_reasons(device: Any) -> list[str]:
    """Whether this machine has the device at all (an environment fact, before any mechanism's needs)."""
    if device is None:
        return []
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    if not torch.cuda.is_available():
        return ["CUDA is not available on this machine; sweep --device cpu or run on a GPU machine"]
    if (dev.index or 0) >= torch.cuda.device_count():
        return [f"{dev} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"]
    return []


_PROBES: dict[tuple, Attention] = {}


def probe_module(name: str, dim: int, heads: int, knobs: KnobsBase, impl: str | None) -> Attention:
    """The module of a configuration, built on the meta device where it can be (cached), to ask it questions."""
    key = (name, dim, heads, impl, tuple(sorted(knobs.as_dict().items())))
    if key not in _PROBES:
        cls = get(name)
        try:
            with torch.device("meta"):
                module = cls(dim=dim, heads=heads, knobs=knobs, impl=impl)
        except (NotImplementedError, RuntimeError):  # a mechanism whose constructor reads tensor data
            module = cls(dim=dim, heads=heads, knobs=knobs, impl=impl)
        if len(_PROBES) > 256:
            _PROBES.clear()
        _PROBES[key] = module
    return _PROBES[key]


def not_supported_reasons(
    name: str,
    *,
    dim: int,
    heads: int,
    hw: HW,
    knobs: dict[str, Any] | KnobsBase | None = None,
    impl: str | None = None,
    batch: int = 1,
    cross: bool = False,
    context_hw: HW | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    grad: bool = False,
) -> list[str]:
    """Can this point run, and if not why: the one answer that build, the harness, presets, models and CLI use.

    Empty when the point runs. Knob values that are not values of their type or range raise
    :class:`KnobError` (they are wrong anywhere); everything that depends on the point is a reason:
    widths and heads, the impl, the device, dtype and autograd an impl declares, cross attention, the
    map rules and the mechanism's own checks. ``cross`` without ``context_hw`` takes the mechanism's
    default context map.
    """
    cls = get(name)
    made = knobs if isinstance(knobs, KnobsBase) else cls.make_knobs(**(knobs or {}))
    for label, value in (("dim", dim), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KnobError(f"{label} must be a positive integer, got {value!r}")
    reasons = cls.static_reasons(dim, heads, made, impl)
    if reasons:
        return reasons
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    module = probe_module(name, dim, heads, made, impl)
    if (cross or cls.requires_context) and context_hw is None:
        if not cls.supports_cross:
            return [f"{name} does not support cross attention"]
        context_hw = module.default_context_hw(hw)
    return module.unsupported(batch, hw, context_hw, dtype=torch_dtype, device=device, grad=grad)


# ---------------------------------------------------------------------- knob values that fit
def knob_candidates(name: str, knob: str, maps: list[HW]) -> list[Any]:
    """Values of ``knob`` worth trying on ``maps``, the default first, then by preference.

    Integers: the default, then smaller values downwards, then larger ones up to the
    largest side of the maps (beyond it a map-sized knob changes nothing); a choice
    (``Literal``, bool): the default, then the others. Other types: the default alone.
    """
    cls = get(name)
    tp, default = cls.knob_types()[knob], cls.knob_defaults()[knob]
    if tp is bool:
        return [default, not default]
    if get_origin(tp) is Literal:
        return [default, *(c for c in get_args(tp) if c != default)]
    if (tp is int or int in get_args(tp)) and isinstance(default, int) and not isinstance(default, bool):
        top = max(default, *(max(hw) for hw in maps))
        return [default, *range(default - 1, 0, -1), *range(default + 1, top + 1)]
    return [default]


def fitting_values(
    name: str,
    knob: str,
    maps: list[HW],
    *,
    dim: int,
    heads: int,
    knobs: dict[str, Any] | None = None,
    impl: str | None = None,
    budget: int | None = None,
    limit: int | None = None,
) -> list[Any]:
    """Values of ``knob`` under which the mechanism runs on every map of ``maps``, by preference.

    The other knobs are ``knobs`` (defaults for the rest). ``budget``: only values whose
    analytic multiply-adds of one image at the largest map are at most this. ``limit``:
    stop after that many. The preference is :func:`knob_candidates`' order, so ``limit=1``
    keeps the default when it fits and otherwise takes the nearest smaller value that does.
    """
    cls = get(name)
    if knob not in cls.knob_types():
        raise KnobError(f"{name} has no knob {knob!r}; its knobs: {', '.join(cls.knob_types())}")
    largest = max(maps, key=map_tokens)
    found: list[Any] = []
    for value in knob_candidates(name, knob, maps):
        try:
            made = cls.make_knobs(**{**(knobs or {}), knob: value})
        except KnobError:
            continue
        point = dict(dim=dim, heads=heads, knobs=made, impl=impl)
        if any(not_supported_reasons(name, hw=hw, **point) for hw in maps):  # type: ignore[arg-type]
            continue
        if budget is not None and probe_module(name, dim, heads, made, impl).macs(1, largest) > budget:
            continue
        found.append(value)
        if limit is not None and len(found) >= limit:
            break
    return found


def fit_knobs(
    name: str,
    maps: list[HW],
    *,
    dim: int,
    heads: int,
    knobs: dict[str, Any] | None = None,
    impl: str | None = None,
) -> dict[str, Any]:
    """``knobs`` with the values that keep the mechanism off every map in ``maps`` replaced.

    Values that fit stay. Otherwise the cost knob is refitted first, then every other knob
    in declaration order, each to its preferred fitting value (:func:`fitting_values`),
    until the point runs on all the maps. Raises :class:`KnobError` naming the reasons when
    no single-knob change makes it run.
    """
    cls = get(name)
    out = dict(knobs or {})

    def reasons() -> list[str]:
        return [
            r for hw in maps for r in not_supported_reasons(name, dim=dim, heads=heads, hw=hw, knobs=out, impl=impl)
        ]

    order = ([cls.cost_knob] if cls.cost_knob else []) + [k for k in cls.knob_types() if k != cls.cost_knob]
    for knob in order:
        if not reasons():
            return out
        values = fitting_values(name, knob, maps, dim=dim, heads=heads, knobs=out, impl=impl, limit=1)
        if values:
            out[knob] = values[0]
    left = reasons()
    if left:
        raise KnobError(f"no knob of {name} fits the maps {maps}: {'; '.join(left)}")
    return out
