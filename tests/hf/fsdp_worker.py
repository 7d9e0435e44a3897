"""Run by test_distributed.py under torchrun: FullScaler on an FSDP2-sharded model equals the hand
formula W0 + s·(W − W0), forward and gradients (each process sees the same batch)."""

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from trap2.scaling import FullScaler, base_params, scaled_params


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5))
    w0 = base_params(model)
    with torch.no_grad():  # the "trained" weights W ≠ W0
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(model)
    for layer in (model[0], model[1], model[3]):
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert model[0].weight.to_local().shape[0] == 8  # really sharded over 2 processes
    scaler = FullScaler(model, w0)
    x = torch.randn(4, 6)
    for s in (0.4, 1.7):
        model.zero_grad()
        ref.zero_grad()
        with scaler.scale(s):
            out = model(x)
        want = functional_call(ref, scaled_params(ref, w0, s), (x,))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        want.square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():  # outside the block: the trained weights again
        torch.testing.assert_close(model(x), ref(x))
    print(f"rank {dist.get_rank()}: FSDP scaled forward and gradients OK", flush=True)
    # every collective finished on both ranks before gloo is torn down: a rank that destroys the group
    # while the other still has async work in flight aborts at exit ("terminate called without an
    # active exception", seen once under CPU contention)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
