"""The memory layout the UNet runs fastest in, by device (measured: benchmarks/README.md)."""

import torch


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """Channels-last on CPU, contiguous elsewhere.

    On CPU, oneDNN's convolutions want channels-last, and the attention's tokens become a free view;
    on CUDA, contiguous trains and samples faster (both measured in benchmarks/README.md).
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def chosen_memory_format(channels_last: bool | None, device: torch.device | str) -> torch.memory_format:
    """--channels_last/--no-channels_last when given, else the device's preferred layout."""
    if channels_last is None:
        return preferred_memory_format(device)
    return torch.channels_last if channels_last else torch.contiguous_format
