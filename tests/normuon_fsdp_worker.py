"""torchrun worker of tests/test_normuon_fsdp.py: a small model wrapped with FSDP2's fully_shard
(DTensor Shard(0) parameters, uneven shards included) steps with harness.normuon.NorMuon on its
half of each global batch; rank 0 also steps an unwrapped copy on the whole batch in this process.
Rank 0 saves both models' weights to OUT/<case>.pt as {"sharded": ..., "single": ...}.

    torchrun --standalone --nproc_per_node=2 tests/normuon_fsdp_worker.py OUT"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from harness.normuon import NorMuon

CASES = {
    "plain": dict(lr=0.02),
    "ord_cautious_wd": dict(lr=0.02, weight_decay=0.5, cautious_wd=True, spectral_lr_mul=0.1),
}
STEPS, BATCH = 4, 8


class Net(torch.nn.Module):
    """13 and 5 rows and 3 stacked matrices: shards of 7+6, 3+2 and 2+1 rows at 2 ranks."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 13, bias=False)
        self.b = torch.nn.Parameter(torch.randn(3, 13, 8) * 0.3)
        self.c = torch.nn.Linear(24, 5, bias=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(torch.einsum("bi,kij->bkj", h, self.b)).flatten(1)
        return self.c(h)


def train(model, kwargs, rows: slice) -> None:
    opt = NorMuon(list(model.parameters()), **kwargs)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 5, generator=g)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()  # a mean: FSDP2 averages the ranks
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for name, kwargs in CASES.items():
            torch.manual_seed(0)
            single = Net()
            sharded = Net()
            sharded.load_state_dict(single.state_dict())
            fully_shard(sharded)
            assert all(isinstance(p, DTensor) for p in sharded.parameters())
            per_rank = BATCH // world
            train(sharded, kwargs, slice(rank * per_rank, (rank + 1) * per_rank))
            got = full_weights(sharded)  # a collective: every rank
            if rank == 0:
                train(single, kwargs, slice(0, BATCH))
                torch.save({"sharded": got, "single": full_weights(single)}, out / f"{name}.pt")
                print(f"ok {name} world_size={world}", flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
