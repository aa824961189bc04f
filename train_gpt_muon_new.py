"""The standard run with Orthogonal-Radial Decomposition (ORD) inside Muon:

    update = Polar(G_perp) + spectral_lr_mul * G_par,   G_par = (<G,W> / ||W||^2) W

    torchrun --standalone --nproc_per_node=8 train_gpt_muon_new.py --preset speedrun --spectral_lr_mul 0.1

ORD knobs: SPECTRAL_LR_MUL (default 1.0), SPECTRAL_LR_MUL_ATTN / _MLP, SPECTRAL_PROJ_EPS,
ORD_PROJECT, ORD_REPROJECT, ORD_PARALLEL_PLACEMENT (after_norm | before_norm).
"""

from harness.trainer import main

if __name__ == "__main__":
    raise SystemExit(main(__file__, overrides={"ord": True}))
