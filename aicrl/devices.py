"""Where torch runs and in which precision: the one place behind every `--device` and autocast.

    device = resolve_device("auto")          # cuda, then mps, then cpu (cuda:LOCAL_RANK under torchrun)
    dtype = autocast_dtype("auto", device)   # torch.bfloat16, torch.float16 or None (fp32)
    with autocast(device, dtype): ...
    scaler = grad_scaler(device, dtype)      # scales the loss only for fp16; a no-op otherwise

Model folders and checkpoints are always written from CPU tensors and loaded onto the CPU first,
so a model trained on one device loads on any other.
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the torch-free runtime imports this module
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICE_HELP = "where torch runs: auto (cuda, then mps, then cpu), cpu, cuda (or cuda:N) or mps"


def add_device_option(parser) -> None:
    """`--device` on an argparse (sub)command that runs torch."""
    parser.add_argument("--device", default="auto", metavar="{" + ",".join(DEVICES) + "}", help=DEVICE_HELP)


def mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device types this machine can run on, cpu first."""
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if mps_available() else [])


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`--device` -> a torch.device. Under torchrun (LOCAL_RANK set) 'cuda' means cuda:LOCAL_RANK, and
    that GPU becomes the current one, which nccl collectives need. Asking for a device the machine
    lacks is an error, never a silent fall-back to the CPU."""
    import torch

    name = str(name)
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: PyTorch sees no CUDA GPU here "
                               f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        local_rank = os.environ.get("LOCAL_RANK")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
        device = torch.device(name)
        if device.index is not None:
            torch.cuda.set_device(device)
        return device
    if name == "mps" and not mps_available():
        raise RuntimeError("--device mps: this PyTorch has no usable MPS (Apple GPU) backend")
    return torch.device(name)


def autocast_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """'bf16' / 'fp16' -> that dtype, 'fp32' -> None (no autocast), 'auto' -> what the device runs
    natively: bf16 on CUDA GPUs from Ampere on and on CPUs with AVX512/AMX, fp16 (with a grad scaler
    for training) on older CUDA GPUs, fp32 elsewhere (MPS, older CPUs)."""
    import torch

    if precision == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            # capability >= 8 (Ampere): bf16 in hardware; older GPUs would only emulate it
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        if device.type == "cpu":
            caps = torch.backends.cpu.get_cpu_capability().lower()
            return torch.bfloat16 if ("amx" in caps or "avx512" in caps) else None
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast on `device`'s type in `dtype`; no autocast at all for None (fp32)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext()


def grad_scaler(device: str | torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler
    passes scale/step/update straight through, so the training loop is the same for all). Scaling
    is done on CUDA, where fp16 is what 'auto' picks on GPUs without bf16."""
    import torch

    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


def distributed_backend(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel with the right device_ids for `device` (one GPU per process)."""
    import torch

    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
