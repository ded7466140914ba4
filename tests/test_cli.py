"""The command-line entry points, run in-process on tiny inputs."""

import csv

import pytest
import torch
from conftest import load_script
from safetensors import safe_open


def test_sample_cli_on_the_analytic_teacher(tmp_path):
    load_script("sample").main(["--teacher", "gmm:ring8", "--solver", "dpmpp_2m", "--nfe", "8", "--n", "50", "--seed", "3",
                            "--out", str(tmp_path)])
    with safe_open(tmp_path / "samples.safetensors", "pt") as f:
        x, meta = f.get_tensor("samples"), f.metadata()
    assert x.shape == (50, 2) and meta["solver"] == "dpmpp_2m" and meta["seeds"] == "3..52"
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_sample_cli_noise_is_per_sample(tmp_path):
    mod = load_script("sample")
    a = mod.per_sample_noise((2,), [5, 6, 7])
    b = mod.per_sample_noise((2,), [6])
    assert torch.equal(a[1], b[0])  # sample 6 is the same whatever batch it is drawn in


def test_sample_cli_on_a_diffusers_folder_writes_an_image_grid(tmp_path, make_teacher_folder):
    folder, _, _ = make_teacher_folder()
    load_script("sample").main(["--teacher", str(folder), "--solver", "euler", "--nfe", "3", "--n", "4", "--out",
                            str(tmp_path / "out")])
    with safe_open(tmp_path / "out" / "samples.safetensors", "pt") as f:
        assert f.get_tensor("samples").shape == (4, 1, 8, 8)
    assert (tmp_path / "out" / "samples.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--solver", "ddim"], "unknown solver 'ddim'; valid solvers:"),
    (["--teacher", "gmm:nope"], "unknown gmm preset 'nope'"),
    (["--solver", "heun", "--nfe", "4"], "cannot spend exactly 4 NFE"),
])
def test_sample_cli_bad_input_exits_with_a_sentence(tmp_path, args, message):
    base = {"--teacher": "gmm:ring8", "--solver": "euler", "--nfe": "4", "--out": str(tmp_path / "x")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    with pytest.raises(SystemExit, match=message):
        load_script("sample").main([a for kv in base.items() for a in kv])
    assert not (tmp_path / "x" / "samples.safetensors").exists()


def test_solver_error_benchmark_writes_csv_and_plot_and_resumes(tmp_path, capsys):
    mod = load_script("solver_error")
    argv = ["--teachers", "gmm:ring8", "--solvers", "euler,heun", "--nfe", "3,4", "--num-samples", "64",
            "--reference-steps", "50", "--out", str(tmp_path)]
    mod.main(argv)
    assert "heun cannot spend exactly 4 NFE" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "solver_error_vs_nfe.csv")))
    assert {(r["solver"], r["nfe"]) for r in rows} == {("euler", "3"), ("euler", "4"), ("heun", "3")}
    assert all(float(r["ode_rmse"]) > 0 and float(r["swd"]) > 0 for r in rows)
    assert (tmp_path / "solver_error_vs_nfe.png").stat().st_size > 10_000
    before = (tmp_path / "solver_error_vs_nfe.csv").read_text()
    mod.main(argv)  # every cell is done: nothing recomputed, nothing rewritten
    assert (tmp_path / "solver_error_vs_nfe.csv").read_text() == before
