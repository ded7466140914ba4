"""AMED-Solver / AMED-Plugin: the teacher's optional features, a trained predictor helping its base solver, NFE
accounting, files tied to their teacher, resumable training."""

import pytest
import torch

from distill.eval.exact import rmse
from distill.solvers import sample
from distill.solvers.prepared.amed.predictor import AmedPredictor
from distill.solvers.prepared.amed.train import AmedConfig, train_amed
from teachers import load_teacher


def _noise(n=500, seed=5):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_diffusers_teacher_returns_its_mid_block_features(make_teacher_folder):
    folder, _, _ = make_teacher_folder()
    teacher = load_teacher(folder)
    x = torch.randn(3, *teacher.data_shape)
    d, feat = teacher.denoise(x, 500.0, return_features=True)
    assert torch.equal(d, teacher.denoise(x, 500.0))  # the same evaluation, features on the side
    assert feat.ndim == 4 and feat.shape[0] == 3 and feat.shape[-1] < x.shape[-1]  # the bottleneck
    d_gmm, f_gmm = load_teacher("gmm:ring8").denoise(torch.randn(4, 2, dtype=torch.float64), 0.5, return_features=True)
    assert torch.equal(d_gmm, f_gmm)  # no network: the data prediction stands in


@pytest.fixture(scope="module")
def trained():
    teacher = load_teacher("gmm:aniso2d")
    out = {}
    for solver in ("euler_amed", "dpmpp_2m_amed", "amed"):
        cfg = AmedConfig(solver=solver, nfe=(2, 4), batch_size=128, num_batches=40)
        out[solver] = train_amed(teacher, cfg, progress=False)
    return teacher, out


@pytest.mark.parametrize("solver,base,nfe", [("euler_amed", "euler", 2), ("dpmpp_2m_amed", "dpmpp_2m", 2),
                                             ("dpmpp_2m_amed", "dpmpp_2m", 4)])
def test_plugin_beats_its_base_solver_at_the_same_nfe(trained, solver, base, nfe):
    # aniso2d, 40 batches of 128: seen 0.49 vs 0.71 (Euler, 2 NFE), 0.49 vs 0.71 (2M, 2 NFE), 0.30 vs 0.33 (2M, 4 NFE)
    teacher, predictors = trained
    ref = sample(teacher, _noise(), solver="unipc", nfe=60, final="direct")
    got = sample(teacher, _noise(), solver=solver, nfe=nfe, grid="uniform", final="direct", amed=predictors[solver])
    want = sample(teacher, _noise(), solver=base, nfe=nfe, grid="uniform", final="direct")
    assert rmse(got, ref) < 0.97 * rmse(want, ref)


def test_amed_solver_improves_on_a_fixed_midpoint(trained):
    teacher, predictors = trained
    ref = sample(teacher, _noise(), solver="unipc", nfe=60, final="direct")

    class Midpoint(torch.nn.Module):  # r = 1/2, c = 1: the untrained AMED step
        solver = "amed"

        def forward(self, feat, lam_cur, lam_next):
            return torch.full((len(feat),), 0.5), torch.ones(len(feat))

    learned = rmse(sample(teacher, _noise(), solver="amed", nfe=4, grid="uniform", final="direct", amed=predictors["amed"]), ref)
    fixed = rmse(sample(teacher, _noise(), solver="amed", nfe=4, grid="uniform", final="direct", amed=Midpoint()), ref)
    assert learned < fixed


def test_nfe_accounting_and_clear_errors(trained, tmp_path):
    teacher, predictors = trained
    _, info = sample(teacher, _noise(8), solver="amed", nfe=6, amed=predictors["amed"], return_info=True)
    assert info["nfe"] == 6 and len(info["ts"]) == 4
    with pytest.raises(ValueError, match="cannot spend exactly 5 NFE"):
        sample(teacher, _noise(8), solver="amed", nfe=5, amed=predictors["amed"])
    with pytest.raises(ValueError, match="needs amed="):
        sample(teacher, _noise(8), solver="amed", nfe=4)
    with pytest.raises(ValueError, match="trained for solver 'euler_amed', not 'amed'"):
        sample(teacher, _noise(8), solver="amed", nfe=4, amed=predictors["euler_amed"])
    predictors["amed"].save(tmp_path / "amed.safetensors")
    back = AmedPredictor.load(tmp_path / "amed.safetensors", teacher)
    a = sample(teacher, _noise(8), solver="amed", nfe=4, amed=str(tmp_path / "amed.safetensors"))
    assert torch.equal(a, sample(teacher, _noise(8), solver="amed", nfe=4, amed=back))
    with pytest.raises(ValueError, match="was made from teacher"):
        sample(load_teacher("gmm:ring8"), _noise(8), solver="amed", nfe=4, amed=str(tmp_path / "amed.safetensors"))


def test_training_resumes_bit_identically(tmp_path):
    teacher = load_teacher("gmm:ring8")
    cfg = AmedConfig(solver="euler_amed", nfe=(2,), batch_size=16, num_batches=6, save_every=2)
    whole = train_amed(teacher, cfg, progress=False)
    state = tmp_path / "state.pt"
    train_amed(teacher, AmedConfig(**{**cfg.__dict__, "num_batches": 6}), state_path=state, progress=False)
    saved = torch.load(state, weights_only=False)
    assert saved["batch"] == 6
    # interrupted after 4 batches: rebuild that state by training 4, then finish to 6
    state2 = tmp_path / "state2.pt"
    partial = AmedConfig(**{**cfg.__dict__})
    partial.num_batches = 4
    train_amed(teacher, partial, state_path=state2, progress=False)
    s2 = torch.load(state2, weights_only=False)
    s2["key"]["config"]["num_batches"] = 6  # as if the 6-batch run had stopped at batch 4
    torch.save(s2, state2)
    resumed = train_amed(teacher, cfg, state_path=state2, progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="belongs to teacher"):
        train_amed(load_teacher("gmm:aniso2d"), cfg, state_path=state2, progress=False)
