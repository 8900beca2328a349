"""Child process of the save fault-injection test: saves an adapter over and over.

usage: save_worker.py FOLDER
Attaches an adapter to a small stack of linear layers and, for v = 1, 2, ...,
fills every adapter tensor with v, saves it into FOLDER and prints v once the
save has returned. The parent kills it with SIGKILL at a random moment.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import matryoshka_lora as ml
from matryoshka_lora.model import adapter_state_dict


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(4))


def make_adapted() -> nn.Module:
    torch.manual_seed(0)
    config = ml.NestedLoraConfig(r=64, target_modules=r"layers\.\d+")
    return ml.attach(Stack(), config)


def fill(model: nn.Module, version: int) -> None:
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.fill_(float(version))


def main() -> None:
    folder = sys.argv[1]
    model = make_adapted()
    version = 0
    while True:
        version += 1
        fill(model, version)
        ml.save_adapter(model, folder)
        print(version, flush=True)


if __name__ == "__main__":
    main()
