"""Models used by the built-in tasks.

Small, dependency-free definitions (torch only) of the standard architectures of the
sharpness-aware literature, so that results are comparable with published numbers:
the MNIST-1D CNN/MLP of Greydanus (2020), the CIFAR ResNet-18 and the pre-activation
WideResNets of Zagoruyko & Komodakis (2016), and for 28x28 grayscale images a small ResNet and
a small CNN (a few CPU-minutes to convergence on Fashion-MNIST).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CIFAR_MODELS",
    "FashionResNet",
    "PreActBlock",
    "ResNet18",
    "WideResNet",
    "build_cifar_model",
    "count_parameters",
    "fashion_cnn",
    "mnist1d_cnn",
    "mnist1d_mlp",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (to report model size without a forward pass)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _init_resnet(model: nn.Module) -> None:
    """He initialisation for convolutions (what the ResNet/WRN papers use)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- MNIST-1D


def mnist1d_cnn(num_classes: int = 10, length: int = 40, channels: int = 32) -> nn.Module:
    """The 1-D CNN of the MNIST-1D paper (no BatchNorm, so per-example losses are independent)."""
    features = nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, 1, length)).shape[1]
    return nn.Sequential(*features, nn.Linear(flat, num_classes))


def mnist1d_mlp(num_classes: int = 10, length: int = 40, hidden: int = 100) -> nn.Module:
    """The 40-100-100-10 ReLU MLP baseline of the MNIST-1D paper."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(length, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


# --------------------------------------------------------------------------- 28x28 CNN


def fashion_cnn(num_classes: int = 10, channels: tuple[int, int] = (8, 16),
                hidden: int = 64, in_channels: int = 1) -> nn.Module:
    """Two 3x3 conv + ReLU + 2x2 max-pool stages, a ReLU hidden layer, a linear head (52k
    parameters at the defaults). No BatchNorm, so per-example losses are independent and
    the scoring forward of K-SAM needs no BatchNorm rule."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al., 2016): two 3x3 convs + shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """3x3 stem (no max-pool) + stages of BasicBlocks + global average pool + linear."""

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        strides: tuple[int, ...],
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for width, n, stride in zip(widths, blocks, strides, strict=True):
            for i in range(n):
                layers.append(BasicBlock(in_planes, width, stride if i == 0 else 1))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_resnet(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


class ResNet18(_ResNet):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, [2, 2, 2, 2] blocks of widths 64..512 (11.2M)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__((64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2), num_classes, in_channels)


class FashionResNet(_ResNet):
    """Small ResNet for 28x28 grayscale: three one-block stages of widths (32, 64, 128) x width."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> None:
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        widths = tuple(max(1, round(c * width)) for c in (32, 64, 128))
        super().__init__(widths, (1, 1, 1), (1, 2, 2), num_classes, in_channels)


class PreActBlock(nn.Module):
    """Pre-activation wide block of Zagoruyko & Komodakis: BN-ReLU-conv-BN-ReLU-(dropout)-conv."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut: nn.Module = nn.Identity()
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        # When the shapes change, the shortcut also sees the pre-activated input (as in the
        # reference implementation); otherwise it is the plain identity.
        shortcut = x if self.equal_in_out else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis, 2016), pre-activation, widths 16, 16k, 32k, 64k."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(PreActBlock(in_planes, width, stride if i == 0 else 1, dropout))
                in_planes = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_resnet(self)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


CIFAR_MODELS: tuple[str, ...] = ("resnet18", "wrn16-8", "wrn28-10")


def build_cifar_model(name: str, num_classes: int) -> nn.Module:
    """Build one of :data:`CIFAR_MODELS` by name (the ``model`` option of the CIFAR tasks)."""
    if name == "resnet18":
        return ResNet18(num_classes)
    if name == "wrn16-8":
        return WideResNet(16, 8, num_classes)
    if name == "wrn28-10":
        return WideResNet(28, 10, num_classes)
    raise ValueError(f"unknown CIFAR model {name!r}; choose one of {', '.join(CIFAR_MODELS)}")
