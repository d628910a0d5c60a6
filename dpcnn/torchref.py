"""dpcnn's CNN in PyTorch: the reference that the benchmarks and the oracle test compare against.

PyTorch is not a dependency: import this module only where torch is importable.
"""

from __future__ import annotations

from .model import ModelSpec


def torch_model(spec: ModelSpec):
    """The same network as dpcnn's CNN(spec), in PyTorch (NCHW); torch must be importable."""
    from torch import nn

    H, W, C = spec.input_shape
    pad = "same" if spec.padding == "same" else 0       # 'same' pads an even kernel's extra row after, as dpcnn
    mods = []
    for F in spec.channels:
        mods += [nn.Conv2d(C, F, spec.kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2)]
        if spec.padding == "valid":
            H, W = H - spec.kernel + 1, W - spec.kernel + 1
        H, W, C = H // 2, W // 2, F
    mods.append(nn.Flatten())
    D = H * W * C
    for F in spec.hidden:
        mods += [nn.Linear(D, F), nn.ReLU()]
        D = F
    mods.append(nn.Linear(D, spec.classes))
    return nn.Sequential(*mods)
