"""The bench's --variant: a solver with named options under its own label (prepared files, searched grids)."""

import pytest
import torch

from distill.eval import bench as lib
from distill.solvers.prepared.teleport.gaussian import fit_gaussian
from teachers import load_teacher


def test_parse_variant_and_plan_cells():
    label, solver, opts = lib.parse_variant("tp2=unipc:teleport=runs/x.safetensors,handoff_sigma=2,order=3,use_corrector=false")
    assert (label, solver) == ("tp2", "unipc")
    assert opts == {"teleport": "runs/x.safetensors", "handoff_sigma": 2, "order": 3, "use_corrector": False}
    cells = lib.plan_cells(["a", "euler"], [2, 3], variants={"a": ("amed", {})}, log=lambda m: None)
    assert [(c.method, c.nfe, c.steps) for c in cells] == [("a", 2, 1), ("euler", 2, 2), ("euler", 3, 3)]
    assert "amed" not in lib.parse_solvers("all")  # needs a predictor file


@pytest.mark.parametrize("text,message", [("nolabel", "expected LABEL=SOLVER"), ("x=nosuch", "unknown solver 'nosuch'"),
                                          ("x=euler:order", "expected key=value")])
def test_bad_variant_is_one_sentence(text, message):
    with pytest.raises(ValueError, match=message):
        lib.parse_variant(text)


def test_variant_cells_run_with_their_options(tmp_path):
    teacher = load_teacher("gmm:aniso2d")
    fit = fit_gaussian(teacher.sample_data(5000, torch.Generator().manual_seed(0)), teacher_hash=teacher.hash)
    fit.save(tmp_path / "g.safetensors")
    cfg = lib.BenchConfig(num_samples=64, batch_size=32, unconditional=True,
                          variants={"tp": ("unipc", {"teleport": str(tmp_path / "g.safetensors"), "handoff_sigma": 1.0})})
    cells = lib.plan_cells(["unipc", "tp"], [3], variants=cfg.variants, log=lambda m: None)
    rows = lib.run_bench(teacher, cells, cfg, lib.ExactMetric(teacher, cfg, 50), tmp_path / "out", log=lambda m: None)
    got = {r["method"]: float(r["swd"]) for r in rows if r["kind"] == "solver"}
    assert set(got) == {"unipc", "tp"} and got["tp"] != got["unipc"]
