"""The course's models and ours, each a plain nn.Module with a BCE (1 logit) or CE (2 logits) head.

    mlp      MLP (ANN): flatten -> [Linear, ReLU, Dropout] x len(hidden) -> Linear
    bn_mlp   deeper MLP: [Linear, BatchNorm1d, ReLU, Dropout] x 4 -> Linear
    cnn      course CNN: 3 x [Conv 32 3x3, ReLU, MaxPool p] -> FC 32 -> out
    gap_cnn  the same conv stack -> AdaptiveAvgPool2d(1) -> FC 32 -> out
    xraynet  ours: 5 x [[Conv 3x3, BatchNorm, ReLU] x convs, MaxPool 2], 8..128 channels -> GAP -> out;
             members=M packs M independent copies side by side (grouped convolutions) and averages
             their logits: an ensemble that is still one network, one graph, one set of taps
"""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, input_size: int, n_out: int, hidden: tuple[int, ...] = (512, 128),
                 dropout: float = 0.5, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size * input_size
        for h in hidden:
            layers += [nn.Linear(width, h)]
            layers += [nn.BatchNorm1d(h)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CourseCNN(nn.Module):
    """3 conv layers of 32 3x3 kernels, each ReLU + max-pool, then FC 32 (flattened or after GAP).

    POOL is one max-pool size for every layer or one per layer: (4, 4, 2) at 128 px leaves the 4x4 map
    the course's 4x4 pooling leaves at 256 px."""

    def __init__(self, input_size: int, n_out: int, channels: int = 32, n_conv: int = 3,
                 pool: int | tuple[int, ...] = 2, fc: int = 32, dropout: float = 0.0, gap: bool = False) -> None:
        super().__init__()
        pools = tuple(pool) if isinstance(pool, tuple | list) else (pool,) * n_conv
        if len(pools) != n_conv:
            raise ValueError(f"{len(pools)} pool sizes for {n_conv} conv layers")
        layers: list[nn.Module] = []
        c_in, side = 1, input_size
        for p in pools:
            layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(p)]
            c_in, side = channels, side // p
        if side < 1:
            raise ValueError(f"input {input_size} px is too small for pools {pools}")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if gap else nn.Identity()
        flat = channels if gap else channels * side * side
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, fc), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(fc, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # The split at the last conv block is what Grad-CAM needs; exported so TorchScript keeps it.
    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @torch.jit.export
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(features))


class MemberMean(nn.Module):
    """[N, M * n_out] member logits -> their mean [N, n_out]; in training, [N, M, n_out] (each member
    takes its own loss, so the members train as independent networks would)."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.members, -1)
        return x if self.training else x.mean(1)


class XrayNet(nn.Module):
    """Our small CNN: BatchNorm conv blocks halve the side and double the width, then GAP.
    CONVS gives each block's number of 3x3 convolutions (default one each): depth where the maps
    are small is cheap. MEMBERS > 1 makes it an ensemble of that many such networks, as one module:
    every layer after the first is grouped by member, so no member sees another's channels, and the
    output is the members' mean logit."""

    def __init__(self, input_size: int, n_out: int, widths: tuple[int, ...] = (8, 16, 32, 64, 128),
                 dropout: float = 0.2, convs: tuple[int, ...] | None = None, members: int = 1) -> None:
        super().__init__()
        if input_size < 2 ** len(widths):
            raise ValueError(f"input {input_size} px is too small for {len(widths)} blocks")
        convs = tuple(convs) if convs is not None else (1,) * len(widths)
        if len(convs) != len(widths) or min(convs) < 1:
            raise ValueError(f"convs {convs} must give each of the {len(widths)} blocks at least one convolution")
        if members < 1:
            raise ValueError(f"members must be at least 1, not {members}")
        m = members
        blocks: list[nn.Module] = []
        c_in, cam_split = 0, 0  # channels per member; 0: the image's one channel, which every member reads
        for i, (w, n) in enumerate(zip(widths, convs, strict=True)):
            for _ in range(n):
                conv = nn.Conv2d(m * c_in, m * w, 3, padding=1, bias=False, groups=m) if c_in else \
                    nn.Conv2d(1, m * w, 3, padding=1, bias=False)  # M separate convolutions of the image
                blocks += [conv, nn.BatchNorm2d(m * w), nn.ReLU(inplace=True)]
                c_in = w
            blocks.append(nn.MaxPool2d(2))
            if i < 3:
                cam_split = len(blocks)
        self.features = nn.Sequential(*blocks)
        self.cam_split: Final[int] = cam_split  # the layers up to the end of block 3
        if m == 1:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                      nn.Linear(c_in, n_out))
        else:  # a 1x1 grouped convolution on the pooled channels is one linear head per member
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout),
                                      nn.Conv2d(m * c_in, m * n_out, 1, groups=m), nn.Flatten(), MemberMean(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # Grad-CAM reads the maps after block 3 of 5 (16x16 at 128 px): the last block's 4x4 is too
    # coarse to show where the model looked. The split leaves the parameters (and checkpoints) as they are.
    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i < self.cam_split:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i >= self.cam_split:
                features = layer(features)
        return self.head(features)


ARCHS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "bn_mlp": (MLP, {"hidden": (512, 256, 128, 64), "batchnorm": True}),
    "cnn": (CourseCNN, {}),
    "gap_cnn": (CourseCNN, {"gap": True}),
    "xraynet": (XrayNet, {}),
}


def arch_args(arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture's full keyword arguments: its defaults, then the overrides (JSON-safe)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose from {sorted(ARCHS)}")
    args = {**ARCHS[arch][1], **(overrides or {})}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def build_model(arch: str, head: str, input_size: int, args: dict[str, Any] | None = None) -> nn.Module:
    cls, _ = ARCHS[arch]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch_args(arch, args).items()}
    return cls(input_size=input_size, n_out=1 if head == "bce" else 2, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
