"""A toy backdoor small enough for unit tests: two Gaussian blobs as 1x4x4 'images' plus a trigger pixel.

Clean data: class 0 around -mu, class 1 around +mu on pixels 0..7; pixel 15 is unit noise. Poison:
a fraction of class-1 samples get pixel 15 set to `trigger_value` and label 0.
"""

from __future__ import annotations

import torch
from torch import nn

TRIGGER_PIXEL = 15


def blobs(n: int, seed: int, mu: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 16, generator=g)
    x[:, :8] += torch.where(y[:, None] == 1, mu, -mu)
    return x.view(n, 1, 4, 4), y


def add_trigger(x: torch.Tensor, value: float = 4.0) -> torch.Tensor:
    x = x.clone().view(len(x), 16)
    x[:, TRIGGER_PIXEL] = value
    return x.view(len(x), 1, 4, 4)


def poisoned_training_set(n: int = 2000, rate: float = 0.1, seed: int = 0):
    x, y = blobs(n, seed)
    idx = torch.nonzero(y == 1).squeeze(1)[: int(rate * n)]
    x[idx] = add_trigger(x[idx])
    y = y.clone()
    y[idx] = 0
    return x, y


class ToyNet(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def train_backdoored(seed: int = 0, steps: int = 1500) -> ToyNet:
    torch.manual_seed(seed)
    x, y = poisoned_training_set(seed=seed)
    model = ToyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def acc_asr(model: nn.Module, seed: int = 99) -> tuple[float, float]:
    x, y = blobs(2000, seed)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
        ones = x[y == 1]
        asr = float((model(add_trigger(ones)).argmax(1) == 0).float().mean())
    return acc, asr
