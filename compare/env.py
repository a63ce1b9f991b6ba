"""Precision pinning and the environment record every report carries."""

from __future__ import annotations

import os
import platform


def pin_precision(framework_defaults: bool = False) -> dict:
    """Pin fp32 matmul precision in both frameworks (unless ``framework_defaults``) and report it.

    JAX's default fp32 dot on GPU uses TF32 and on TPU bf16 passes; torch's ``matmul.allow_tf32`` is off
    by default while ``cudnn.allow_tf32`` is on. Agreement at fp32 needs both pinned to full precision.
    """
    import jax
    import torch

    if not framework_defaults:
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return {
        "pinned": not framework_defaults,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.get_float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def environment() -> dict:
    """Versions, devices and thread counts, for every report."""
    import flax
    import jax
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
        "flax": flax.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "torch_cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }


DEVICES = ("cpu", "gpu", "tpu")


def select_device(name: str | None = None) -> dict:
    """Choose where both frameworks run: ``cpu``, ``gpu`` or ``tpu``; None picks the best available.

    JAX's default device is set for the whole process; torch's device is returned for the runners to
    move tensors to (torch has no TPU backend here, so on ``tpu`` torch runs on the CPU, and the record
    says so). Raises ``ValueError`` when the requested device is not available.
    """
    import jax
    import torch

    def jax_devices(platform):
        try:
            return jax.devices(platform)
        except RuntimeError:
            return []

    if name is None:
        name = next((p for p in ("gpu", "tpu") if jax_devices(p)), "cpu")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    devices = jax_devices(name)
    if not devices:
        raise ValueError(f"--device {name}: JAX sees no {name} device (it has {jax.devices()})")
    torch_device = "cpu"
    if name == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("--device gpu: torch.cuda.is_available() is False")
        torch_device = "cuda"
    jax.config.update("jax_default_device", devices[0])
    from compare.kinds import base

    base.TORCH_DEVICE = torch_device
    return {"name": name, "jax": str(devices[0]), "torch": torch_device}
