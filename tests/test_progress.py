"""Progress (issue #33): the long commands show a tqdm bar on stderr, the library functions they call stay quiet by
default, and log lines printed while a bar runs go above it (``distill.core.progress``)."""

import torch
from conftest import load_script
from tqdm import tqdm

from distill.core.progress import above_bars
from distill.eval.consistency_error import consistency_error
from distill.solvers import sample
from teachers import load_teacher


def test_sample_cli_shows_a_bar_over_the_network_evaluations_of_all_batches(tmp_path, capsys):
    argv = ["--teacher", "gmm:ring8", "--solver", "dpmpp_2m", "--nfe", "4", "--n", "10", "--batch-size", "4", "--out",
            str(tmp_path / "o")]
    assert load_script("sample").main(argv) == 0
    err = capsys.readouterr().err
    assert "dpmpp_2m NFE 4: 100%" in err and "12/12" in err  # 3 batches x 4 NFE


def test_sample_advances_a_given_bar_once_per_evaluation_and_is_quiet_without_one(capsys):
    teacher = load_teacher("gmm:ring8")
    noise = torch.randn(5, 2, dtype=torch.float64)
    updates = []

    class Bar:  # what sample() needs of a tqdm bar
        def update(self, n):
            updates.append(n)

    sample(teacher, noise, solver="heun", nfe=5, nfe_bar=Bar())
    assert updates == [1] * 5
    sample(teacher, noise, solver="heun", nfe=5)
    assert capsys.readouterr().err == ""


def test_reflow_eval_and_teacher_quality_bars(capsys):
    teacher = load_teacher("gmm:ring8@rectified_flow")
    rows = load_script("reflow_eval").evaluate(teacher, ["teacher"], ["1", "2"], 8)
    assert len(rows) == 3 and capsys.readouterr().err == ""  # quiet by default (tests, library use)
    load_script("reflow_eval").evaluate(teacher, ["teacher"], ["1", "2"], 8, progress=True)
    assert "reflow_eval: 100%" in capsys.readouterr().err
    x, _ = load_script("teacher_quality").generate(load_teacher("gmm:ring8"), 6, "dpmpp_2m", 4, 0, batch=4, uncond=True,
                                                   progress=True)
    assert x.shape == (6, 2) and "unconditional samples: 100%" in capsys.readouterr().err


def test_consistency_error_bar_only_with_a_label(capsys):
    teacher = load_teacher("gmm:ring8")
    x0 = teacher.sample_data(4, generator=torch.Generator().manual_seed(0))
    f = lambda x, t, c: x  # noqa: E731
    consistency_error(f, teacher, x0, [0.5, 0.2], reference_steps=4)
    assert capsys.readouterr().err == ""
    consistency_error(f, teacher, x0, [0.5, 0.2], reference_steps=4, desc="identity data")
    assert "identity data" in capsys.readouterr().err


def test_log_lines_go_above_an_active_bar(capsys):
    lines = []
    with tqdm(total=2, desc="work") as bar:
        above_bars(lines.append)("first")
        bar.update(1)
        above_bars()("second")
    out, err = capsys.readouterr()
    assert lines == ["first"] and out == "second\n"
    # the bar was cleared before each line ("\r" + blanks) and redrawn after it, not written over
    assert err.count("work:") >= 3 and "\r" in err
