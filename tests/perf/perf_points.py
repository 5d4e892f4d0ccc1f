"""What the perf cases measure and on which machine: their points, device, threads and machine key.

The points come from the sweep harness (``bench.points.expand``), so every
registered mechanism and every implementation it declares gets a case without
this file naming any of them: CPU-sized (the ``smoke`` preset's small-map cost
knobs at 16x16 and 32x32, float32, one thread) by default, GPU-sized (the
``scaling`` preset at 56x56 and 112x112, bfloat16, mechanism defaults) when CUDA
is present.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

import torch
from attnbench.bench import presets
from attnbench.bench.points import Grid, Point, expand

from attnbench import attentions

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# One intra-op thread on the CPU (as the CPU presets): spinning threads on a small shared CPU make latency erratic.
THREADS = torch.get_num_threads() if CUDA else 1

CPU_RESOLUTIONS = ["16", "32"]
# Stage 1 of a 224 px and a 448 px image: divisible by the default windows (7), reductions and quadtree levels.
GPU_RESOLUTIONS = ["56", "112"]


def grid() -> Grid:
    impls = sorted({impl for name in attentions.available() for impl in attentions.get(name).impls})
    if CUDA:
        values = presets.get("scaling")["grid"]
        values["resolutions"] = GPU_RESOLUTIONS
    else:
        values = presets.get("smoke")["grid"]
        values["resolutions"] = CPU_RESOLUTIONS
    values["impls"] = impls  # every implementation any mechanism declares; the others are refused below
    values["devices"] = [DEVICE]
    return Grid.from_dict(values)


def points() -> list[Point]:
    """Every (mechanism, impl, pass, resolution) the mechanism accepts statically, in registry order."""
    expansion = expand(grid())
    return [p for p in expansion.points if p not in expansion.refused]


def case_id(point: Point) -> str:
    """A stable, readable test id, e.g. ``swin-window4-fast-fwd+bwd-16x16``: it names the point in a regression."""
    cost = attentions.get(point.mechanism).cost_knob
    knob = dict(point.knobs).get(cost) if cost else None
    parts = [point.mechanism]
    if knob is not None:
        parts.append(f"{cost}{_slug(str(knob))}")
    parts += [point.impl, point.pass_, f"{point.height}x{point.width}"]
    if point.cross:
        parts.append("cross")
    return "-".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "-", text).strip("-")


@functools.cache
def machine_info() -> dict[str, Any]:
    """The comparable part of the harness's environment fingerprint (bench.env), with the perf thread count."""
    from attnbench.bench.env import comparable, fingerprint

    return comparable(fingerprint(threads=THREADS))


def machine_key(info: dict[str, Any] | None = None) -> str:
    """The folder name of this machine's baselines, e.g. ``cpu-AMD-EPYC-7B13-torch2.13.0+cpu-1a2b3c4d``:
    the device and torch version for people, a hash of every comparable field for the rest."""
    info = info or machine_info()
    gpus = info.get("gpu_names") or []
    device = f"gpu-{gpus[0]}" if gpus else f"cpu-{info.get('cpu_model')}"
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{_slug(device)}-torch{_slug(str(info.get('torch')))}-{digest}"
