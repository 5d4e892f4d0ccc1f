"""Sweep points: one configuration to measure, and the grid that expands into them.

A :class:`Grid` holds a list of values per axis; :func:`expand` takes their
cartesian product, resolving every mechanism's full knob set from the registry,
so nothing here knows a mechanism by name. A :class:`Point` is frozen and has a
stable ``point_id`` (a hash of its configuration) that the results store uses to
resume a sweep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from typing import Any

from attnbench.errors import AttnbenchError

PASSES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "float16", "bfloat16", "float64")

# Hierarchical backbones: patch embedding of stride 4, then 2x downsampling per
# stage. Stage s (1-based) of an image of size S sees a token map of S / (4 * 2^(s-1)).
PATCH_STRIDE = 4
# Width and heads per stage used by ``dim: stage`` (Swin-T: 96-192-384-768, 3-6-12-24 heads).
STAGE_WIDTHS = {1: (96, 3), 2: (192, 6), 3: (384, 12), 4: (768, 24)}
# Video backbones (Video Swin, MViTv2) embed 2 frames per token: a clip of F frames has F / 2 token frames.
TEMPORAL_STRIDE = 2


class GridError(AttnbenchError, ValueError):
    """A sweep request (its grid, settings or sweep file) is malformed."""


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A token map ``height x width`` (``frames x height x width`` for a clip); ``image``/``stage`` when it is
    a backbone stage (``clip``: the frames of the input clip)."""

    height: int
    width: int
    image: tuple[int, int] | None = None
    stage: int | None = None
    frames: int | None = None
    clip: int | None = None

    @property
    def hw(self) -> tuple[int, ...]:
        """(H, W), or (T, H, W) for a clip."""
        return (self.height, self.width) if self.frames is None else (self.frames, self.height, self.width)

    def label(self) -> str:
        base = "x".join(map(str, self.hw))
        if self.stage is not None and self.image is not None:
            of = f"{self.clip} frames of " if self.clip else ""
            return f"{base} (stage {self.stage} of {of}{self.image[0]}x{self.image[1]} px)"
        return base


_RES = re.compile(r"^(\d+)(?:x(\d+))?$")
_STAGE = re.compile(r"^(\d+)(?:x(\d+))?px(?::s(\d+))?$")
_CLIP = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_CLIP_STAGE = re.compile(r"^(\d+)f:(\d+)(?:x(\d+))?px(?::s(\d+))?$")


def parse_resolution(text: str | int | Resolution) -> list[Resolution]:
    """``"64"`` -> 64x64, ``"64x96"`` -> 64x96, ``"224px:s2"`` -> stage 2 of a 224 px image (28x28),
    ``"224px"`` -> the four stages of a 224 px image; clips: ``"8x56x56"`` -> T x H x W, ``"32f:224px"`` -> the
    four stages of a 32-frame clip of 224 px (16x56x56 ... 16x7x7: two frames per token)."""
    if isinstance(text, Resolution):
        return [text]
    if isinstance(text, int):
        text = str(text)
    s = str(text).strip().lower().replace(" ", "")
    m = _CLIP.match(s)
    if m:
        t, h, w = (int(g) for g in m.groups())
        if min(t, h, w) < 1:
            raise GridError(f"resolution {text!r} must be positive")
        return [Resolution(h, w, frames=t)]
    m = _CLIP_STAGE.match(s)
    if m:
        clip, ih = int(m.group(1)), int(m.group(2))
        iw = int(m.group(3) or ih)
        if clip < TEMPORAL_STRIDE:
            raise GridError(f"a clip of {clip} frames has no token frame (two frames per token); use >= 2 frames")
        stages = [int(m.group(4))] if m.group(4) else sorted(STAGE_WIDTHS)
        return [
            dataclasses.replace(stage_resolution((ih, iw), st), frames=clip // TEMPORAL_STRIDE, clip=clip)
            for st in stages
        ]
    m = _RES.match(s)
    if m:
        h = int(m.group(1))
        w = int(m.group(2) or h)
        if h < 1 or w < 1:
            raise GridError(f"resolution {text!r} must be positive")
        return [Resolution(h, w)]
    m = _STAGE.match(s)
    if m:
        ih = int(m.group(1))
        iw = int(m.group(2) or ih)
        stages = [int(m.group(3))] if m.group(3) else sorted(STAGE_WIDTHS)
        return [stage_resolution((ih, iw), st) for st in stages]
    raise GridError(
        f"cannot read resolution {text!r}; write 64 (64x64), 64x96 (H x W), 224px:s2 (stage 2 of a 224 px image), "
        "224px (all four stages), 8x56x56 (T x H x W) or 32f:224px (the four stages of a 32-frame clip)"
    )


def stage_resolution(image: tuple[int, int], stage: int) -> Resolution:
    if stage not in STAGE_WIDTHS:
        raise GridError(f"stage must be one of {sorted(STAGE_WIDTHS)}, got {stage}")
    stride = PATCH_STRIDE * 2 ** (stage - 1)
    h, w = image[0] // stride, image[1] // stride
    if h < 1 or w < 1:
        raise GridError(f"a {image[0]}x{image[1]} px image has no stage {stage} (stride {stride})")
    return Resolution(h, w, image=tuple(image), stage=stage)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration to measure. ``knobs`` is the full, resolved knob set (sorted items)."""

    mechanism: str
    knobs: tuple[tuple[str, Any], ...]
    height: int
    width: int
    batch: int
    dim: int
    heads: int
    dtype: str
    pass_: str
    impl: str
    compile: bool
    device: str
    cross: bool = False
    image_height: int | None = None
    image_width: int | None = None
    stage: int | None = None
    # Token frames of a (T, H, W) clip map; None for an (H, W) map.
    frames: int | None = None

    @property
    def hw(self) -> tuple[int, ...]:
        """The map the mechanism sees: (H, W), or (T, H, W) for a clip."""
        return (self.height, self.width) if self.frames is None else (self.frames, self.height, self.width)

    @property
    def tokens(self) -> int:
        return self.height * self.width * (self.frames or 1)

    def knob_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.knobs}

    def config(self) -> dict[str, Any]:
        """The flat configuration fields as stored in results.jsonl."""
        return {
            "mechanism": self.mechanism,
            "knobs": self.knob_dict(),
            "height": self.height,
            "width": self.width,
            "tokens": self.tokens,
            "batch": self.batch,
            "dim": self.dim,
            "heads": self.heads,
            "dtype": self.dtype,
            "pass": self.pass_,
            "impl": self.impl,
            "compile": self.compile,
            "device": self.device,
            "cross": self.cross,
            "image_height": self.image_height,
            "image_width": self.image_width,
            "stage": self.stage,
            # only on clips, so that every image point keeps its id
            **({"frames": self.frames} if self.frames is not None else {}),
        }

    @property
    def point_id(self) -> str:
        """Stable hash of the configuration (the same point always gets the same id)."""
        blob = json.dumps(self.config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"point_id": self.point_id, **self.config()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Point:
        knobs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d["knobs"].items()))
        return cls(
            mechanism=d["mechanism"],
            knobs=knobs,
            height=int(d["height"]),
            width=int(d["width"]),
            batch=int(d["batch"]),
            dim=int(d["dim"]),
            heads=int(d["heads"]),
            dtype=d["dtype"],
            pass_=d["pass"],
            impl=d["impl"],
            compile=bool(d["compile"]),
            device=d["device"],
            cross=bool(d.get("cross", False)),
            image_height=d.get("image_height"),
            image_width=d.get("image_width"),
            stage=d.get("stage"),
            frames=None if d.get("frames") is None else int(d["frames"]),
        )

    def label(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs)
        return (
            f"{self.mechanism}[{knobs}] {'x'.join(map(str, self.hw))} b{self.batch} d{self.dim}/h{self.heads} "
            f"{self.dtype} {self.pass_} {self.impl}{' compiled' if self.compile else ''} {self.device}"
            + (" cross" if self.cross else "")
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Grid:
    """Values per axis. ``knobs`` maps a knob name to the values to sweep; a knob
    applies to every selected mechanism that has a knob of that name (the others
    keep their defaults). ``dims`` may hold ``"stage"``: the stage's width and heads
    (``STAGE_WIDTHS``) for resolutions that are backbone stages."""

    mechanisms: list[str] = dataclasses.field(default_factory=list)  # empty: every registered mechanism
    resolutions: list[Any] = dataclasses.field(default_factory=lambda: ["16"])
    batches: list[int] = dataclasses.field(default_factory=lambda: [1])
    dims: list[Any] = dataclasses.field(default_factory=lambda: [64])
    heads: list[int] = dataclasses.field(default_factory=lambda: [2])
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["float32"])
    passes: list[str] = dataclasses.field(default_factory=lambda: ["fwd"])
    impls: list[str] = dataclasses.field(default_factory=lambda: ["fast"])
    compile: list[bool] = dataclasses.field(default_factory=lambda: [False])
    devices: list[str] = dataclasses.field(default_factory=lambda: [_default_device()])
    cross: list[bool] = dataclasses.field(default_factory=lambda: [False])
    # Token frames: every resolution becomes a T x H x W clip map of each (empty: the maps as given).
    frames: list[int] = dataclasses.field(default_factory=list)
    knobs: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    # Values of each mechanism's *cost knob*, keyed by the cost knob's name
    # (e.g. {"topk": [4, 8, 16]}); used by presets to sweep cost generically.
    cost_knob_values: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    # Only mechanisms whose cost knob has one of these names (empty: no filter).
    cost_knob_names: list[str] = dataclasses.field(default_factory=list)
    # Replace knob defaults that a mechanism's map rules refuse on the grid's maps by the values the
    # mechanism says fit all of them (attentions.fit_knobs; swept knobs keep their values).
    fit_knobs: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        fields = {f.name for f in dataclasses.fields(cls)}
        aliases = {
            "mechanism": "mechanisms",
            "resolution": "resolutions",
            "batch": "batches",
            "dim": "dims",
            "dtype": "dtypes",
            "pass": "passes",
            "impl": "impls",
            "device": "devices",
        }
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = aliases.get(key, key)
            if name not in fields:
                raise GridError(f"unknown sweep field {key!r}; valid fields: {', '.join(sorted(fields))}")
            if name == "fit_knobs":
                if not isinstance(value, bool):
                    raise GridError(f"fit_knobs must be true or false, got {value!r}")
                kwargs[name] = value
                continue
            if name in ("knobs", "cost_knob_values"):
                if not isinstance(value, dict):
                    raise GridError(f"{key} must be a mapping of knob name to a list of values, got {value!r}")
                value = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in value.items()}
            elif not isinstance(value, (list, tuple)):
                value = [value]
            kwargs[name] = list(value) if not isinstance(value, dict) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Expansion:
    points: list[Point]
    # Points refused before measuring, with the reasons attentions.not_supported_reasons gives.
    refused: dict[Point, list[str]]


def _check_values(label: str, values: list[Any], allowed: tuple[str, ...]) -> None:
    for v in values:
        if v not in allowed:
            raise GridError(f"{label} {v!r} is not one of {', '.join(allowed)}")


def expand(grid: Grid) -> Expansion:
    """The cartesian product of the grid's axes, one Point each (duplicates removed).

    Knob values are validated by the mechanism's own typed knobs (a bad value
    raises at once); points the mechanism refuses (``point_reasons``, the
    registry's one answer) are returned in ``refused`` so the sweep records them
    as ``skipped``.
    """
    from attnbench import attentions

    load_plugins()
    names = grid.mechanisms or attentions.available()
    for name in names:
        attentions.get(name)  # unknown names fail here, listing the valid ones
    if grid.cost_knob_names:
        names = [n for n in names if attentions.get(n).cost_knob in grid.cost_knob_names]
        if not names:
            raise GridError(f"no selected mechanism has a cost knob named {', '.join(grid.cost_knob_names)}")
    for axis in ("resolutions", "batches", "dims", "heads", "dtypes", "passes", "impls", "compile", "devices", "cross"):
        if not getattr(grid, axis):
            raise GridError(f"the sweep's {axis} list is empty; give at least one value")
    _check_values("pass", grid.passes, PASSES)
    _check_values("dtype", grid.dtypes, DTYPES)
    for label, values in (("batch", grid.batches), ("heads", grid.heads)):
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GridError(f"{label} values must be positive integers, got {v!r}")
    for dev in grid.devices:
        if not re.match(r"^(cpu|cuda(:\d+)?)$", str(dev)):
            raise GridError(f"device {dev!r} must be cpu, cuda or cuda:N")
    for key in grid.knobs:
        if not any(key in attentions.get(n).knob_types() for n in names):
            known = sorted({k for n in names for k in attentions.get(n).knob_types()})
            raise GridError(f"knob {key!r} belongs to none of {', '.join(names)}; their knobs: {', '.join(known)}")
    resolutions = [r for text in grid.resolutions for r in parse_resolution(text)]
    for t in grid.frames:
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise GridError(f"frames must be positive integers, got {t!r}")
    if grid.frames:
        resolutions = [dataclasses.replace(r, frames=t) for r in resolutions for t in grid.frames]

    points: list[Point] = []
    refused: dict[Point, list[str]] = {}
    seen: set[Point] = set()
    for name in names:
        cls = attentions.get(name)
        types_ = cls.knob_types()
        axes = {k: v for k, v in grid.knobs.items() if k in types_}
        if cls.cost_knob and cls.cost_knob in grid.cost_knob_values and cls.cost_knob not in axes:
            axes[cls.cost_knob] = grid.cost_knob_values[cls.cost_knob]
        fitted = _fitted_knobs(grid, name, resolutions) if grid.fit_knobs else {}
        knob_sets = []
        for combo in itertools.product(*axes.values()):
            knobs = cls.make_knobs(**fitted, **dict(zip(axes, combo, strict=True)))  # raises KnobError naming the fix
            knob_sets.append(tuple(sorted(knobs.as_dict().items())))
        for knobs, res, batch, dim, heads, dtype, pass_, impl, comp, device, cross in itertools.product(
            knob_sets,
            resolutions,
            grid.batches,
            grid.dims,
            grid.heads,
            grid.dtypes,
            grid.passes,
            grid.impls,
            grid.compile,
            grid.devices,
            grid.cross,
        ):
            if dim == "stage":
                if res.stage is None:
                    raise GridError(f"dim 'stage' needs stage resolutions such as 224px:s1, got {res.label()}")
                dim, heads = STAGE_WIDTHS[res.stage]
            elif not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise GridError(f"dim values must be positive integers or 'stage', got {dim!r}")
            cross = bool(cross) or cls.requires_context
            point = Point(
                mechanism=name,
                knobs=knobs,
                height=res.height,
                width=res.width,
                batch=batch,
                dim=dim,
                heads=heads,
                dtype=dtype,
                pass_=pass_,
                impl=impl,
                compile=bool(comp),
                device=str(device),
                cross=cross,
                image_height=res.image[0] if res.image else None,
                image_width=res.image[1] if res.image else None,
                stage=res.stage,
                frames=res.frames,
            )
            if point in seen:
                continue
            seen.add(point)
            points.append(point)
            try:
                reasons = point_reasons(point)
            except Exception:  # noqa: BLE001 - a module that fails to build: the sweep records that error
                continue
            if reasons:
                refused[point] = reasons
    return Expansion(points, refused)


def _fitted_knobs(grid: Grid, name: str, resolutions: list[Resolution]) -> dict[str, Any]:
    """The knobs attentions.fit_knobs gives for the grid's maps, at its first width and heads (none for
    stage widths, or when no knob change fits: the points then say why they are refused)."""
    from attnbench import attentions

    dims = [d for d in grid.dims if isinstance(d, int) and not isinstance(d, bool)]
    if not dims or not grid.heads:
        return {}
    swept = set(grid.knobs) | set(grid.cost_knob_values)
    try:
        fitted = attentions.fit_knobs(name, [r.hw for r in resolutions], dim=dims[0], heads=grid.heads[0])
    except attentions.KnobError:
        return {}
    return {k: v for k, v in fitted.items() if k not in swept}


def point_reasons(point: Point) -> list[str]:
    """Why a point cannot run on this machine (empty when it can): attentions.not_supported_reasons of it."""
    from attnbench import attentions

    return attentions.not_supported_reasons(
        point.mechanism,
        dim=point.dim,
        heads=point.heads,
        hw=point.hw,
        knobs=point.knob_dict(),
        impl=point.impl,
        batch=point.batch,
        cross=point.cross,
        dtype=point.dtype,
        device=point.device,
        grad=point.pass_ == "fwd+bwd",
    )


def load_plugins() -> list[str]:
    """Import the modules named in ``ATTNBENCH_PLUGINS`` (comma-separated); each may
    ``@register`` extra mechanisms so that a sweep, and every worker process, sees them."""
    import importlib
    import os

    names = [n.strip() for n in os.environ.get("ATTNBENCH_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise _plugin_error(name, exc) from None  # the plugin imports something that is missing
            raise GridError(
                f"ATTNBENCH_PLUGINS names {name!r}, which cannot be found; put its folder on PYTHONPATH, "
                "or remove it from ATTNBENCH_PLUGINS"
            ) from None
        except SyntaxError as exc:
            where = f"{exc.filename}, line {exc.lineno}" if exc.filename else "its source"
            raise GridError(
                f"ATTNBENCH_PLUGINS module {name!r} has a syntax error ({where}: {exc.msg}); fix it, "
                "or remove it from ATTNBENCH_PLUGINS"
            ) from None
        except SystemExit as exc:  # a plugin must not end the process: its exit status would hide the reason
            raise GridError(
                f"ATTNBENCH_PLUGINS module {name!r} called sys.exit({exc.code!r}) while being imported; "
                "a plugin must only register mechanisms, so fix it or remove it from ATTNBENCH_PLUGINS"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure of foreign code becomes one line
            raise _plugin_error(name, exc) from None
    return names


def _plugin_error(name: str, exc: BaseException) -> GridError:
    text = " ".join(str(exc).split())[:200]
    return GridError(
        f"ATTNBENCH_PLUGINS module {name!r} failed while being imported ({type(exc).__name__}: {text}); "
        "fix it, or remove it from ATTNBENCH_PLUGINS"
    )


def split_values(values: list[str] | None) -> list[str]:
    """``["8,16", "32"]`` -> ``["8", "16", "32"]``; commas inside brackets stay (``[16,8,8]``)."""
    out: list[str] = []
    for text in values or []:
        depth, cur = 0, ""
        for ch in str(text):
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            if ch == "," and depth == 0:
                if cur.strip():
                    out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            out.append(cur.strip())
    return out


def parse_knob(text: str) -> tuple[str, list[Any]]:
    """``"topk=4,8,16"`` -> ``("topk", ["4", "8", "16"])``; ``"topk=[16,8,8],[8,4,4]"`` gives lists
    (one value per level). Strings are converted by the mechanism's typed knobs."""
    if "=" not in text:
        raise GridError(f"--knob takes NAME=V1,V2,..., got {text!r}")
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name.isidentifier():
        raise GridError(f"--knob name {name!r} is not a knob name")
    values: list[Any] = []
    for v in split_values([rest]):
        if v.startswith(("[", "(")) and v.endswith(("]", ")")):
            values.append([p.strip() for p in v[1:-1].split(",") if p.strip()])
        else:
            values.append(v)
    if not values:
        raise GridError(f"--knob {name}= needs at least one value")
    return name, values


def parse_ints(label: str, values: list[str]) -> list[int]:
    out = []
    for v in split_values(values):
        try:
            out.append(int(v))
        except ValueError:
            raise GridError(f"{label} takes integers, got {v!r}") from None
    return out
