"""The preparation scripts of the fast samplers run end to end on an analytic teacher, resume, and refuse another
teacher's files in one sentence."""

import pytest
import torch
from conftest import load_script

from distill.solvers import sample
from teachers import load_teacher


def _noise(n=64):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_prepare_then_sample_with_every_file(tmp_path, capsys):
    teacher = load_teacher("gmm:aniso2d")
    ems, gits, fit, amed = (tmp_path / n for n in ("ems.safetensors", "gits.json", "g.safetensors", "amed.safetensors"))
    assert load_script("compute_ems").main(["--teacher", "gmm:aniso2d", "--n-lams", "8", "--num-samples", "128",
                                            "--out", str(ems)]) == 0
    assert load_script("gits_search").main(["--teacher", "gmm:aniso2d", "--steps", "2,3", "--num-samples", "64",
                                            "--fine-steps", "10", "--out", str(gits)]) == 0
    assert load_script("fit_gaussian").main(["--teacher", "gmm:aniso2d", "--num-samples", "2000", "--out", str(fit)]) == 0
    assert load_script("train_amed").main(["--teacher", "gmm:aniso2d", "--nfe", "2", "--batch-size", "16",
                                           "--num-batches", "2", "--out", str(amed)]) == 0
    for opts in ({"solver": "dpm_solver_v3", "ems": str(ems)}, {"solver": "unipc", "grid": str(gits)},
                 {"solver": "unipc", "teleport": str(fit), "handoff_sigma": 1.0}, {"solver": "amed", "amed": str(amed)}):
        x = sample(teacher, _noise(), nfe=2, final="direct", **opts)
        assert bool(torch.isfinite(x).all())
    # a rerun resumes from the finished states (nothing left to do) and rewrites the same files
    assert load_script("compute_ems").main(["--teacher", "gmm:aniso2d", "--n-lams", "8", "--num-samples", "128",
                                            "--out", str(ems)]) == 0
    # another teacher's state is refused in one sentence
    for script, args in (("compute_ems", ["--n-lams", "8", "--num-samples", "128", "--out", str(ems)]),
                         ("gits_search", ["--steps", "2", "--num-samples", "64", "--fine-steps", "10", "--out", str(gits)]),
                         ("train_amed", ["--nfe", "2", "--batch-size", "16", "--num-batches", "2", "--out", str(amed)])):
        with pytest.raises(SystemExit, match="belongs to teacher"):
            load_script(script).main(["--teacher", "gmm:ring8", *args])
