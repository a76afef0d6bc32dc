"""The FedAvg workload of the peer anchor, shared by the bare and the Flower variant.

Data: scikit-learn ``load_digits`` (1797 8x8 images), pixels / 16. IID split: one seeded
permutation cut into ``NUM_CLIENTS`` near-equal parts; each client keeps the first 80 % for
training and the rest for test (360 test samples in all).
Model: Conv2d(1,16,3,p1)+ReLU+MaxPool2 -> Conv2d(16,32,3,p1)+ReLU+MaxPool2 -> Linear(128,10),
initialised from a fixed seed. Training: plain SGD lr 0.05, batch 32, cross-entropy,
1 local epoch; each client's batch order is a randperm seeded by (round, client id), so the
bare and the Flower variant see the same batches.

Importing this module sets torch to 1 intra-op thread (in every process that imports it,
Ray actors included), as the anchor did.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)

NUM_CLIENTS = int(os.environ.get("SIMKIT_BENCH_CLIENTS", "10"))
ROUNDS = int(os.environ.get("SIMKIT_BENCH_ROUNDS", "5"))
LR = 0.05
BATCH = 32
LOCAL_EPOCHS = 1
TRAIN_FRACTION = 0.8
SEED = 0

_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def new_model() -> Net:
    torch.manual_seed(SEED)
    return Net()


def load_partition(cid: int, num_clients: int = NUM_CLIENTS):
    """``(x_train, y_train, x_test, y_test)`` of client ``cid`` (cached per process)."""
    if cid not in _CACHE:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.tensor(d.target, dtype=torch.long)
        perm = np.random.default_rng(SEED).permutation(len(y))
        for i, idx in enumerate(np.array_split(perm, num_clients)):
            idx = torch.as_tensor(idx)
            n_tr = int(TRAIN_FRACTION * len(idx))
            _CACHE[i] = (x[idx[:n_tr]], y[idx[:n_tr]], x[idx[n_tr:]], y[idx[n_tr:]])
    return _CACHE[cid]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, rnd: int, cid: int) -> float:
    """Local training of one client in round ``rnd``; returns the mean loss."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    total, steps = 0.0, 0
    for ep in range(LOCAL_EPOCHS):
        g = torch.Generator().manual_seed(100_000 * rnd + 1000 * ep + cid)
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), BATCH):
            b = order[s:s + BATCH]
            opt.zero_grad()
            loss = loss_fn(net(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.detach().item()
            steps += 1
    return total / max(1, steps)


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """``(correct, summed loss)`` of ``net`` on ``(x, y)``."""
    net.eval()
    out = net(x)
    return int((out.argmax(1) == y).sum()), float(nn.functional.cross_entropy(out, y, reduction="sum"))


def write_result(payload: dict) -> None:
    """Hand a variant's result to the benchmark driver (file named by SIMKIT_BENCH_RESULT)."""
    import json

    path = os.environ.get("SIMKIT_BENCH_RESULT")
    text = json.dumps(payload)
    if path:
        with open(path, "w") as f:
            f.write(text)
    print("BENCH_RESULT " + text, flush=True)


def now() -> float:
    return time.perf_counter()
