"""The torch device a command runs its dense work on (``--device``): the one place a device name
is checked, for both sides (open_clip encoding, the exact pass, prompts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clip_density_index.indexer.errors import InvalidParameter

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> "torch.device":
    """The ``torch.device`` named by ``device``: ``"auto"`` -> CUDA when torch sees a GPU, else the
    CPU; any other name (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is checked against this machine.

    Raises:
        InvalidParameter: an unknown device name, or a device torch cannot see.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameter(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameter.naming("Device {name!r}: torch sees no CUDA GPU on this machine "
                                          "(use {device} cpu, or auto)", name=device)
        if dev.index is not None and dev.index >= count:
            raise InvalidParameter(f"Device {device!r}: torch sees {count} CUDA GPU(s), cuda:0 to "
                                   f"cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameter.naming("Device {name!r}: this torch build or machine has no MPS (Apple GPU) "
                                      "support (use {device} cpu, or auto)", name=device)
    return dev
