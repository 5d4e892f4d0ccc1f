"""Named sweeps (``attnbench sweep --preset NAME``), as data.

Presets never list mechanisms by name: they select by the registry's
declarations (for example, mechanisms whose cost knob is named ``topk``) and
give values per cost-knob name, which apply to whichever mechanism declares a
cost knob of that name.
"""

from __future__ import annotations

import copy
from typing import Any

from attnbench.errors import UnknownName

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
        "description": "the main job: every mechanism on 16x16..64x64 maps at Swin-T's stage-1 width (96, 3 heads), "
        "fwd and fwd+bwd, fast impls, float32, on the CPU",
        "grid": {
            "resolutions": ["16", "24", "32", "48", "64"],
            "batches": [1],
            "dims": [96],
            "heads": [3],
            "dtypes": ["float32"],
            "passes": ["fwd", "fwd+bwd"],
            # The reference paths (the definitions of correct) would triple the time; --impls adds them.
            "impls": ["fast"],
            "devices": ["cpu"],
            # knob values every mechanism says fit all these maps (a window that divides them all), asked of
            # the registry when the grid expands; the mechanisms' own defaults wherever those fit
            "fit_knobs": True,
        },
        "settings": {"cpu_min_run_time": 0.15, "timeout_s": 60.0, "min_samples": 9, "threads": 1},
    },
    "smoke": {
        "description": "CI smoke, the former quick grid: every mechanism, CPU-sized: 8x8..32x32 maps, fwd and fwd+bwd, "
        "reference and fast, float32",
        "grid": {
            "resolutions": ["8", "12", "16", "24", "32"],
            "batches": [1],
            "dims": [32],
            "heads": [2],
            "dtypes": ["float32"],
            "passes": ["fwd", "fwd+bwd"],
            "impls": ["reference", "fast"],
            "devices": ["cpu"],
            # knob values every mechanism says fit all these maps (windows that divide them, a top-K below
            # the coarsest level's tokens), asked of the registry when the grid expands
            "fit_knobs": True,
        },
        # One thread: on a small shared CPU, spinning intra-op threads make latency erratic. 45 ms of samples
        # per point (15 ms per round; at least 4 samples a round): a smoke run checks that every point runs and
        # reports, and its set-up (imports, module, first call, profiled call, probes) is a fixed cost per
        # point, so longer sampling makes it slower, not more useful (160 points: 7.2 s of timed calls).
        "settings": {"cpu_min_run_time": 0.045, "timeout_s": 30.0, "min_samples": 12, "threads": 1},
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
    "video": {
        "description": "Video Swin-T's and MViTv2-S's stage maps (GPU), bf16: 16- and 32-frame clips of 224 px, two "
        "frames per token (8 and 16 x 56x56 ... 7x7) at the stage widths; swin with Video Swin-T's 8-frame windows, "
        "pooling with MViTv2's 3-frame kernel; mechanisms without a time axis are skipped with their reason",
        "grid": {
            **GPU_GRID,
            "resolutions": ["16f:224px", "32f:224px"],
            "dims": ["stage"],
            "heads": [1],
            "knobs": {"window_t": [8], "kernel_t": [3]},
        },
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
        raise UnknownName(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# The sweeps of scripts/gpu_run.sh: the scaling grid, measured to fit a short GPU session. Shorter CUDA
# warm-up and timing windows (still at least 3 samples per point), a 30 s limit per point, and the analytic MAC
# count in place of an fvcore trace of every point (``count_flops``; the trace cannot follow the compiled flex
# path anyway). The CPU settings only matter for the CPU dry run of that script.
PRESETS["gpu-run"] = {
    "description": "the scaling grid measured for a short GPU session (scripts/gpu_run.sh): analytic MACs",
    "grid": copy.deepcopy(PRESETS["scaling"]["grid"]),
    "settings": {
        "timeout_s": 30.0,
        "cuda_warmup_ms": 10.0,
        "cuda_rep_ms": 50.0,
        "cuda_settle_s": 0.5,  # warm-up until the call time settles, at most this long per point
        "count_flops": False,
        "cpu_min_run_time": 0.01,
        "min_samples": 3,
    },
}
