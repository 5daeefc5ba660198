"""The torch device a command runs its dense work on (``--device``)."""

from __future__ import annotations

from clip_density_index.indexer.errors import InvalidParameter


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; other names are checked.

    Raises:
        InvalidParameter: an unknown device name, or a CUDA device torch cannot see.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameter(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameter(f"Device {device!r}: torch sees no CUDA GPU on this machine "
                                   "(use --device cpu, or auto)")
        if dev.index is not None and dev.index >= count:
            raise InvalidParameter(f"Device {device!r}: torch sees {count} CUDA GPU(s), cuda:0 to "
                                   f"cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameter(f"Device {device!r}: this torch build or machine has no MPS (Apple GPU) "
                               "support (use --device cpu, or auto)")
    return device
