"""Named sweeps (``attnbench sweep --preset NAME``), as data.

Presets never list mechanisms by name: they select by the registry's
declarations (for example, mechanisms whose cost knob is named ``topk``) and
give values per cost-knob name, which apply to whichever mechanism declares a
cost knob of that name.
"""

from __future__ import annotations

import copy
from typing import Any

# Cost-knob values that keep every mechanism runnable on small CPU maps
# (8x8 .. 32x32): windows and reductions that divide them, a top-K below the
# coarsest level's token count.
SMALL_MAP_COST = {"window": [4], "sr_ratio": [2], "stride_kv": [2], "stride": [2], "topk": [4]}

# What the GPU presets share: batch 1, dim 128 in 4 heads, bf16, fwd and fwd+bwd, the fast impls.
GPU_GRID: dict[str, Any] = {
    "batches": [1],
    "dims": [128],
    "heads": [4],
    "dtypes": ["bfloat16"],
    "passes": ["fwd", "fwd+bwd"],
    "impls": ["fast"],
    "devices": ["cuda"],
}
GPU_SETTINGS: dict[str, Any] = {"timeout_s": 120.0}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "description": "every mechanism, CPU-sized: 8x8..32x32 maps, fwd and fwd+bwd, reference and fast, float32",
        "grid": {
            "resolutions": ["8", "12", "16", "24", "32"],
            "batches": [1],
            "dims": [32],
            "heads": [2],
            "dtypes": ["float32"],
            "passes": ["fwd", "fwd+bwd"],
            "impls": ["reference", "fast"],
            "devices": ["cpu"],
            "cost_knob_values": SMALL_MAP_COST,
        },
        # One thread: on a small shared CPU, spinning intra-op threads make latency erratic.
        "settings": {"cpu_min_run_time": 0.06, "timeout_s": 30.0, "min_samples": 5, "threads": 1},
    },
    "scaling": {
        "description": "GPU: token maps from 16x16 to 384x384, bf16, fwd and fwd+bwd, fast impls",
        "grid": {**GPU_GRID, "resolutions": ["16", "32", "48", "64", "96", "128", "192", "256", "384"]},
        "settings": GPU_SETTINGS,
    },
    "topk": {
        "description": "top-K sensitivity of the mechanisms whose cost knob is topk, against resolution (GPU)",
        "grid": {
            **GPU_GRID,
            "resolutions": ["32", "64", "128", "256"],
            "cost_knob_names": ["topk"],
            "cost_knob_values": {"topk": [1, 2, 4, 8, 16, 32, 64]},
        },
        "settings": GPU_SETTINGS,
    },
    "batch": {
        "description": "batch scaling at a 64x64 map (GPU), bf16, fwd and fwd+bwd",
        "grid": {**GPU_GRID, "resolutions": ["64"], "batches": [1, 2, 4, 8, 16, 32, 64]},
        "settings": GPU_SETTINGS,
    },
    "paper": {
        "description": "the four stage maps of a 224 px image (56, 28, 14, 7) at Swin-T widths (GPU), bf16",
        # dims "stage": each stage's width and heads (STAGE_WIDTHS) replace dims and heads
        "grid": {**GPU_GRID, "resolutions": ["224px"], "batches": [1, 64], "dims": ["stage"], "heads": [1]},
        "settings": GPU_SETTINGS,
    },
    "stages": {
        "description": "every backbone stage of 224..1024 px images (GPU), bf16: the maps real backbones see",
        "grid": {
            **GPU_GRID,
            "resolutions": ["224px", "384px", "512px", "768px", "1024px"],
            "dims": ["stage"],
            "heads": [1],
        },
        "settings": GPU_SETTINGS,
    },
}


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> dict[str, Any]:
    """A deep copy of a preset: {"description", "grid", "settings"}."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
