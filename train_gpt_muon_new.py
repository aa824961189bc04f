"""The standard run with Orthogonal-Radial Decomposition (ORD) inside Muon, as the fork's code:

    update = NorMuon(Polar(G - s G_par)) + s G_par,   G_par = (<G,W> / ||W||^2) W,   s = spectral_lr_mul

    torchrun --standalone --nproc_per_node=8 train_gpt_muon_new.py --preset speedrun --spectral_lr_mul 0.1

G is in the fork's gradient units (sum loss x grad_scale). ORD knobs: SPECTRAL_LR_MUL (default 1.0),
SPECTRAL_LR_MUL_ATTN / _MLP, SPECTRAL_PROJ_EPS, ORD_FORM (interpolated | projected),
ORD_UNITS (fork | mean), ORD_PLACEMENT (after_norm | before_norm), ORD_REPROJECT.
"""

from harness.config import script_overrides
from harness.trainer import main

if __name__ == "__main__":
    raise SystemExit(main(__file__, overrides=script_overrides(__file__)))
