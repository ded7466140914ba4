"""The AMED time predictor and its file (Zhou et al., CVPR 2024; the authors' ``AMED_predictor``); its training is in
``distill.solvers.prepared.amed.train``.

The predictor reads the teacher's bottleneck feature at the start of a step (averaged over channels, as the
authors' code does with the U-Net's 8x8 block), plus sinusoidal embeddings of lam at both ends of the step, and
returns r in (0, 1) (where the intermediate evaluation goes) and a direction scale c in [1 - scale_dir, 1 + scale_dir].
Training: teacher trajectories through the same grids, M sub-steps of an accurate solver between grid points; per
step the student's x_next is pulled to the teacher's (squared error summed over pixels, mean over the batch) and the
optimizer steps after every step index; single-step rules restart each step from the teacher's state, the multistep
rule (2M) from its own. One predictor serves every step count it was trained on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill.solvers.prepared import files as prepared

PLUGIN_RULES = {"amed": "amed", "euler_amed": "euler", "dpmpp_2m_amed": "dpmpp_2m"}
FREQS = (0.05, 0.1, 0.2, 0.4)  # of the lam embeddings (lam spans about -10..10)


def reduce_features(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the channel mean [B, H * W] (the authors' reduction); anything else -> flattened."""
    return (feat.mean(1) if feat.ndim == 4 else feat).flatten(1).float()


class AmedPredictor(nn.Module):
    def __init__(self, feature_dim: int, hidden: int = 128, scale_dir: float = 0.01, solver: str = "amed",
                 teacher_hash: str = ""):
        super().__init__()
        if solver not in PLUGIN_RULES:
            raise ValueError(f"unknown AMED solver {solver!r}; allowed: {', '.join(PLUGIN_RULES)}")
        self.feature_dim, self.hidden, self.scale_dir = feature_dim, hidden, scale_dir
        self.solver, self.teacher_hash, self.meta = solver, teacher_hash, {}
        self.norm = nn.LayerNorm(feature_dim)
        self.net = nn.Sequential(nn.Linear(feature_dim + 4 * len(FREQS), hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2))

    @staticmethod
    def _embed(lam: float, batch: int) -> torch.Tensor:
        ang = torch.tensor([lam * f * 2 * math.pi for f in FREQS])
        return torch.cat([ang.sin(), ang.cos()]).expand(batch, -1)

    def forward(self, feat: torch.Tensor, lam_cur: float, lam_next: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = reduce_features(feat).to(self.norm.weight.device)
        if z.shape[1] != self.feature_dim:
            raise ValueError(f"the AMED predictor takes {self.feature_dim} feature values, the teacher gave {z.shape[1]}")
        emb = torch.cat([self._embed(lam_cur, len(z)), self._embed(lam_next, len(z))], 1).to(z.device)
        out = self.net(torch.cat([self.norm(z), emb], 1))
        r = torch.sigmoid(out[:, 0])
        c = 1 + self.scale_dir * torch.tanh(out[:, 1])
        return r.to(feat.device), c.to(feat.device)

    def save(self, path, meta: dict | None = None) -> None:
        info = {"kind": "amed", "teacher_hash": self.teacher_hash, "solver": self.solver, "feature_dim": self.feature_dim,
                "hidden": self.hidden, "scale_dir": self.scale_dir, **(meta or self.meta)}
        prepared.save_tensors(path, dict(self.state_dict()), info)

    @classmethod
    def load(cls, path, teacher=None) -> "AmedPredictor":
        tensors, meta = prepared.load_tensors(path, "amed", teacher)
        model = cls(int(meta["feature_dim"]), int(meta["hidden"]), float(meta["scale_dir"]), meta["solver"], meta["teacher_hash"])
        model.load_state_dict(tensors)
        model.meta = {k: v for k, v in meta.items() if k not in ("kind", "teacher_hash", "solver", "feature_dim", "hidden", "scale_dir")}
        return model.eval().requires_grad_(False)
