import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A two-layer MLP with LoRA-targetable names, for exact gradient and scaling checks."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(scope="session")
def digits():
    from trap2.suites import get_suite

    return get_suite("digits")
