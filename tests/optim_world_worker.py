"""torchrun worker of tests/test_optim_world.py: the sharded optimizers against the
single-tensor reference at this world size (tests/optim_reference.py), one flag set per
argument; rank 0 saves the stepped weights to OUT/<flag set>.pt. Then, for the Adam shards:
every rank writes the shapes of the Adam moments it holds to OUT/adam_shapes_<rank>.json, and
rank 0 saves a tied-embedding run with a split step (run_tied_split) to OUT/tied_split.pt.

    torchrun --standalone --nproc_per_node=N tests/optim_world_worker.py OUT NAME [NAME ...]"""

import json
import sys
from pathlib import Path

import torch

from harness import dist as hdist
from harness.config import load_config
from harness.optim import LabelledAdam, Optimizers
from optim_reference import FLAG_SETS, MICRO, micro_grads, run_against_reference, small_model

TIED_STEPS, TIED_SPLIT = 8, 5


def run_tied_split(info: hdist.DistInfo) -> dict:
    """The speedrun preset's Adam (adam_every 2, tied_embed) on a head (5, 13) stored transposed
    to its embedding (13, 5) and a scalars vector (7,): rows that no world size of 2 or 3
    divides, so the last rank's block is padded. Each rank holds its slice of the MICRO
    gradients; the embedding is untied at step TIED_SPLIT (its state taken over from the
    head's, re-sharded). Returns the weights and the gathered state."""
    cfg = load_config(["--preset", "speedrun"], env={})
    torch.manual_seed(8)
    head = torch.nn.Parameter(torch.randn(5, 13))
    embed = torch.nn.Parameter(head.detach().T.clone())
    scalars = torch.nn.Parameter(torch.randn(7))
    model = torch.nn.ParameterDict({"lm_head": head, "embed": embed, "scalars": scalars})
    adam = LabelledAdam([(n, n, p) for n, p in model.items()], cfg, split_step=TIED_SPLIT, info=info)
    per = MICRO // info.world_size
    for step in range(TIED_STEPS):
        for name, g in micro_grads(model, step, range(info.rank * per, (info.rank + 1) * per)).items():
            p = model[name]
            p.grad = g if p.grad is None else p.grad + g
        if adam.due(step):
            adam.step(step, 1.0)
            adam.zero_grad()
    assert not adam.tied
    return {"weights": {n: p.detach().clone() for n, p in model.items()}, "state": adam.state_dict()}


def adam_shapes(info: hdist.DistInfo) -> dict[str, list[list[int]]]:
    """{parameter: [its shape, the shape of each moment this rank holds]} of the small model."""
    cfg, model = small_model()
    opt = Optimizers(model, cfg, info)
    return {e.name: [list(e.param.shape), list(e.exp_avg.shape), list(e.exp_avg_sq.shape)]
            for e in opt.adam.entries}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    info = hdist.init()
    try:
        for name in names:
            model = run_against_reference(FLAG_SETS[name], info)
            if info.is_main:
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}.pt")
                print(f"ok {name} world_size={info.world_size}", flush=True)
        (out / f"adam_shapes_{info.rank}.json").write_text(json.dumps(adam_shapes(info)))
        tied = run_tied_split(info)
        if info.is_main:
            torch.save(tied, out / "tied_split.pt")
    finally:
        hdist.shutdown(info)


if __name__ == "__main__":
    main()
