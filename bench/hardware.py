"""Peak throughput and memory bandwidth of known GPUs, from their data sheets.

Dense (no structured sparsity) tensor-core peaks in TFLOP/s (one multiply-add
counts as two FLOPs) and HBM/GDDR bandwidth in GB/s. Used only at read time to
derive achieved TFLOP/s as a share of the peak; never stored with results.
This module must not import torch (reports read results without it).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    name: str
    # Dense peaks in TFLOP/s.
    bf16: float
    fp16: float
    tf32: float
    fp32: float
    # Memory bandwidth in GB/s.
    bandwidth_gbs: float
    source: str

    def peak_tflops(self, dtype: str, tf32: bool = False) -> float:
        """Peak for a dtype name; float32 uses the TF32 tensor-core peak only when TF32 matmuls are enabled."""
        if dtype == "bfloat16":
            return self.bf16
        if dtype == "float16":
            return self.fp16
        if dtype == "float32":
            return self.tf32 if tf32 else self.fp32
        raise KeyError(f"no peak for dtype {dtype!r} on {self.name}")


# Pattern on torch.cuda.get_device_name() -> spec. Order matters: the first match wins.
# The NVL boards are PCIe cards at a lower power (H200 NVL up to 600 W, H100 NVL 350-400 W) with lower clocks:
# their datasheet columns ("H200 NVL", "H100 NVL") give FP32 60, TF32 835, BF16 and FP16 1,671 TFLOP/s (the tensor
# rates with sparsity, halved here), and 4.8 TB/s (H200 NVL, 141 GB) or 3.9 TB/s (H100 NVL, 94 GB). nvidia-smi
# names them "NVIDIA H200 NVL" and "NVIDIA H100 NVL"; a plain "NVIDIA H200" is the SXM part. The patterns start at
# a word boundary so that a Grace Hopper board ("NVIDIA GH200 480GB", its own clocks and memory) matches none.
GPUS: list[tuple[str, GPUSpec]] = [
    (
        r"\bH200.*NVL",
        GPUSpec("NVIDIA H200 NVL", 835.5, 835.5, 417.5, 60.0, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet"),
    ),
    (
        r"\bH200",
        GPUSpec("NVIDIA H200 SXM", 989.5, 989.5, 494.5, 67.0, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet"),
    ),
    (
        r"\bH100.*NVL",
        GPUSpec("NVIDIA H100 NVL", 835.5, 835.5, 417.5, 60.0, 3900.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    ),
    (
        r"\bH100.*PCIe",
        GPUSpec("NVIDIA H100 PCIe", 756.5, 756.5, 378.0, 51.0, 2000.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    ),
    (
        r"\bH100",
        GPUSpec("NVIDIA H100 SXM", 989.5, 989.5, 494.5, 67.0, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    ),
    (
        r"A100.*(80GB.*PCIe|PCIe.*80GB)",
        GPUSpec("NVIDIA A100 80GB PCIe", 312.0, 312.0, 156.0, 19.5, 1935.0, "NVIDIA A100 Tensor Core GPU datasheet"),
    ),
    (
        r"A100.*80GB",
        GPUSpec("NVIDIA A100 80GB SXM", 312.0, 312.0, 156.0, 19.5, 2039.0, "NVIDIA A100 Tensor Core GPU datasheet"),
    ),
    (
        r"A100",
        GPUSpec("NVIDIA A100 40GB", 312.0, 312.0, 156.0, 19.5, 1555.0, "NVIDIA A100 Tensor Core GPU datasheet"),
    ),
    (
        r"\bL4\b",
        GPUSpec("NVIDIA L4", 121.0, 121.0, 60.0, 30.3, 300.0, "NVIDIA L4 Tensor Core GPU datasheet"),
    ),
    (
        r"RTX 4090",
        # GeForce: tensor-core peak with FP32 accumulation (the rate PyTorch matmuls use).
        GPUSpec("NVIDIA GeForce RTX 4090", 165.2, 165.2, 82.6, 82.6, 1008.0, "NVIDIA Ada GPU architecture whitepaper"),
    ),
]


def lookup(device_name: str | None) -> GPUSpec | None:
    """The spec of a GPU from its reported name, or None when it is not in the table."""
    if not device_name:
        return None
    for pattern, spec in GPUS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return spec
    return None
