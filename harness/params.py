"""The parameter table: what every model parameter is, for the optimizers, diagnostics and run log.

A model describes its parameters once (`model.param_specs()`), like modded-nanogpt's param
table: a label that picks the optimizer and its hyperparameters, and for Muon parameters how
the tensor splits into matrices (`param.view(-1, *matrix_shape)[i]` is matrix i) and what role
each matrix plays. The optimizer turns labels and roles into learning rates (harness/optim.py);
nothing downstream parses parameter names.

Labels (the fork's): Muon: "attn", "mlp"; Adam: "embed", "lm_head", "value_embed",
"bigram_embed", "scalars", "x0_lambdas", "smear_gate", "skip_gate", "attn_gate_bank",
"ve_gate_bank". Matrix roles: "attn_q", "attn_k", "attn_v", "attn_o", "mlp_fc", "mlp_proj",
"pad" (a padding matrix of a bank: updated, never used by the forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

MUON_LABELS = ("attn", "mlp")
ADAM_LABELS = ("embed", "lm_head", "value_embed", "bigram_embed", "scalars", "x0_lambdas",
               "smear_gate", "skip_gate", "attn_gate_bank", "ve_gate_bank")
MATRIX_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_fc", "mlp_proj", "pad")


@dataclass(frozen=True)
class MatrixSpec:
    name: str  # e.g. "blocks.3.attn.q": what diagnostics and the run log call it
    role: str  # one of MATRIX_ROLES


@dataclass(frozen=True)
class ParamSpec:
    name: str  # the name in model.named_parameters()
    label: str  # one of MUON_LABELS or ADAM_LABELS
    # Muon parameters: the parameter viewed as (-1, *matrix_shape) is the stack of its matrices,
    # in the order of `matrices`; matrix_shape is the layout the forward pass uses (out, in).
    matrix_shape: tuple[int, int] | None = None
    matrices: tuple[MatrixSpec, ...] = ()

    @property
    def optim(self) -> str:
        return "muon" if self.label in MUON_LABELS else "adam"

    def __post_init__(self) -> None:
        if self.label not in MUON_LABELS + ADAM_LABELS:
            raise ValueError(f"{self.name}: unknown parameter label {self.label!r}")
        if (self.label in MUON_LABELS) != bool(self.matrices):
            raise ValueError(f"{self.name}: Muon parameters (and only they) list their matrices")
        for m in self.matrices:
            if m.role not in MATRIX_ROLES:
                raise ValueError(f"{self.name}: unknown matrix role {m.role!r}")
