"""torchrun worker of tests/test_optim_world.py: the sharded optimizers against the
single-tensor reference at this world size (tests/optim_reference.py), one flag set per
argument; rank 0 saves the stepped weights to OUT/<flag set>.pt.

    torchrun --standalone --nproc_per_node=N tests/optim_world_worker.py OUT NAME [NAME ...]"""

import sys
from pathlib import Path

import torch

from harness import dist as hdist
from optim_reference import FLAG_SETS, run_against_reference


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    info = hdist.init()
    try:
        for name in names:
            model = run_against_reference(FLAG_SETS[name], info)
            if info.is_main:
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}.pt")
                print(f"ok {name} world_size={info.world_size}", flush=True)
    finally:
        hdist.shutdown(info)


if __name__ == "__main__":
    main()
