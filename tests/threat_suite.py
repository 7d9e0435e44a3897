"""A tiny suite for the threat tests: a two-layer MLP backbone, three tasks whose labels come from a
known update each (so the "teacher" fine-tuned model is exact: 100 % on its own task), frozen linear
heads. Each task's update is returned too, as the unprotected pool."""

import torch
from torch import nn

from trap2.suites import Split, make_suite
from trap2.suites.base import Task
from trap2.updates import Update, apply_delta

D_IN, HIDDEN, FEATS, CLASSES = 6, 16, 8, 3


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, FEATS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


def threat_suite(n_tasks: int = 3, n: tuple[int, int, int] = (400, 200, 400)):
    """(suite, {task: its exact update}) ."""
    backbone = _backbone()
    w0 = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    tasks, updates = [], {}
    for i in range(n_tasks):
        name = f"t{i}"
        delta = {
            "fc1.weight": 0.8 * torch.randn(HIDDEN, D_IN, generator=gen),
            "fc2.weight": 0.8 * torch.randn(FEATS, HIDDEN, generator=gen),
        }
        head = nn.Linear(FEATS, CLASSES)
        with torch.no_grad():
            head.weight.copy_(3 * torch.randn(CLASSES, FEATS, generator=gen))
            head.bias.zero_()
        head.requires_grad_(False)
        params = apply_delta(w0, delta)
        splits = []
        for size in n:
            x = torch.randn(size, D_IN, generator=gen)
            with torch.no_grad():
                y = head(torch.func.functional_call(backbone, params, (x,))).argmax(-1)
            splits.append(Split(x, y))
        tasks.append(Task(name, CLASSES, *splits, head=head))
        updates[name] = Update(delta, {"task": name})
    suite = make_suite(
        "threat-tiny",
        tasks,
        _backbone,
        lora_targets=("fc1", "fc2"),
        fingerprint="threat-tiny",
        backbone=backbone,
    )
    return suite, updates
