"""FID vs NFE (scripts/bench.py, distill/eval/bench/): end to end on a tiny UNet, resume, FID against
torch-fidelity, identical noise in every cell, exact metrics for analytic teachers, bad input."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import save_teacher_folder, tiny_unet

from distill.data import load_dataset
from distill.eval.bench import BenchConfig, generate, parse_solvers, plan_cells, run_bench
from distill.eval.fid import compute_features, feature_statistics, fid_kid, frechet_distance
from distill.eval.solver_error import make_problem, run_cell
from distill.solvers import per_sample_noise, sample
from teachers import load_teacher
from teachers.diffusers_folder import DiffusersTeacher

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(out: Path) -> list[dict]:
    with open(out / "fid_vs_nfe.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def digit_teacher(tmp_path):
    """A tiny random class-conditional UNet on 16x16 grey images, the input of the mnist16 feature extractor."""
    from diffusers import DDPMScheduler

    return save_teacher_folder(tmp_path / "teacher", tiny_unet(num_class_embeds=10, sample_size=16), DDPMScheduler())


def test_bench_end_to_end_writes_csv_and_png_then_resumes_without_sampling(tmp_path, digit_teacher, monkeypatch, capsys):
    calls = []
    denoise = DiffusersTeacher._denoise
    monkeypatch.setattr(DiffusersTeacher, "_denoise", lambda self, x, t, c: calls.append(len(x)) or denoise(self, x, t, c))
    out = tmp_path / "out"
    argv = ["--teacher", str(digit_teacher), "--solvers", "euler,heun", "--nfe", "2,3", "--num-samples", "20", "--batch-size", "8",
            "--fid-cache", str(tmp_path / "cache"), "--bootstrap", "10", "--save-images", "--out", str(out)]
    _bench().main(argv)
    assert "'heun' cannot spend exactly 2 NFE" in capsys.readouterr().out
    rows = _rows(out)
    cells = [r for r in rows if r["kind"] not in ("floor", "training")]
    assert [(r["method"], r["kind"], r["nfe"]) for r in cells] == [("euler", "solver", "2"), ("euler", "solver", "3"),
                                                                   ("heun", "solver", "3")]
    assert len(calls) == (2 + 3 + 3) * 3 and sum(calls) == (2 + 3 + 3) * 20  # 3 batches of 8, 8, 4 per cell
    teacher_hash = load_teacher(digit_teacher).hash
    for r in cells:
        assert float(r["fid"]) > 0 and float(r["kid"]) == float(r["kid"]) and float(r["seconds_per_sample"]) > 0
        assert float(r["fid_std"]) > 0 and 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
        assert 0 <= float(r["copy_rate"]) <= 1 and 0 <= float(r["closer_to_train"]) <= 1
        assert (r["num_samples"], r["seed"], r["labels"], r["teacher_hash"]) == ("20", "0", "cycle", teacher_hash)
        assert r["reference_id"].startswith("mnist16-classifier-ref-") and r["ode_rmse"] == "" and r["protocol"] == "2"
    (floor,) = [r for r in rows if r["kind"] == "floor"]
    (training,) = [r for r in rows if r["kind"] == "training"]
    assert floor["method"] == "data floor (floor vs reference)" and training["method"] == "training data"
    for data_row in (floor, training):  # the cells' sample count and reference
        assert (data_row["num_samples"], data_row["reference_id"]) == ("20", cells[0]["reference_id"])
    assert 0 < float(floor["fid"]) < min(float(r["fid"]) for r in cells)  # real digits beat a random UNet
    assert float(training["copy_rate"]) == 1.0 and floor["copy_rate"] == ""  # training digits are copies by definition
    same_reference = fid_kid(load_dataset("mnist16", "floor").x[:20], load_dataset("mnist16", "reference").x, kid_subset_size=20)
    assert float(floor["fid"]) == pytest.approx(same_reference["fid"], rel=1e-4)  # measured against the cells' reference
    assert (out / "fid_vs_nfe.png").stat().st_size > 10_000 and (out / "samples" / "solver-euler.png").is_file()
    table = (out / "fid_vs_nfe.md").read_text().splitlines()
    fid = {(r["method"], r["nfe"]): float(r["fid"]) for r in cells}
    std = {(r["method"], r["nfe"]): float(r["fid_std"]) for r in cells}
    assert table[0] == "| fid | 2 | 3 |" and table[3] == f"| `heun` | - | {fid['heun', '3']:.1f} +- {std['heun', '3']:.1f} |"
    assert table[-2].startswith("data floor (floor vs reference) (20 samples): ") and table[-1].startswith("training data (20 samples)")
    pngs = sorted((out / "images" / "solver-heun_nfe3").glob("*.png"))
    fid = {(r["method"], r["nfe"]): float(r["fid"]) for r in cells}
    assert len(pngs) == 20 and pngs[0].name == "000000.png"
    # torch-fidelity's own CLI on the written folders reproduces the cell's FID
    from distill.eval.fidelity_cli import main as fidelity

    assert len(list((out / "images" / "reference").glob("*.png"))) == len(load_dataset("mnist16", "reference").x)
    capsys.readouterr()
    fidelity(["--input1", str(out / "images" / "solver-heun_nfe3"), "--input2", str(out / "images" / "reference"), "--fid",
              "--feature-extractor", "mnist16-classifier", "--cpu", "--json", "--silent"])
    theirs = json.loads(capsys.readouterr().out)["frechet_inception_distance"]
    assert theirs == pytest.approx(fid["heun", "3"], rel=1e-5)

    before, calls[:] = (out / "fid_vs_nfe.csv").read_bytes(), []
    _bench().main(argv)  # every cell done: no teacher call, the CSV (timings included) untouched
    assert calls == [] and (out / "fid_vs_nfe.csv").read_bytes() == before
    assert "3 of 3 cells already in" in capsys.readouterr().out

    (out / "fid_vs_nfe.png").unlink()
    _bench().main(["--plot-only", "--out", str(out)])  # the picture comes back from the files alone
    assert (out / "fid_vs_nfe.png").stat().st_size > 10_000 and calls == []
    _bench().main(["--plot-only", "--out", str(out), "--plot-with", str(out)])  # one more picture with another folder's cells
    assert (out / "fid_vs_nfe_with_out.png").stat().st_size > 10_000 and calls == []

    _bench().main(argv + ["--final", "clean"])  # another grid ending: new cells, the old ones kept
    assert len(calls) == (2 + 3 + 3) * 3 and "already in" not in capsys.readouterr().out
    rows = _rows(out)
    assert sorted(r["final"] for r in rows if r["kind"] == "solver") == ["clean"] * 3 + ["direct"] * 3
    legacy = [{k: v for k, v in r.items() if k != "final"} for r in rows if r["final"] == "clean" and r["kind"] == "solver"]
    with open(out / "fid_vs_nfe.csv", "w", newline="") as f:  # a CSV from before the final column existed
        w = csv.DictWriter(f, fieldnames=list(legacy[0]))
        w.writeheader()
        w.writerows(legacy)
    calls[:] = []
    _bench().main(argv + ["--final", "clean"])  # its rows were made with final="clean": nothing to redo
    assert calls == [] and "3 of 3 cells already in" in capsys.readouterr().out


def test_frechet_distance_equals_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(300, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.3
    f2 = torch.randn(250, 64, generator=g, dtype=torch.float64) + 0.5
    s1, s2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    theirs = fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    ours = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert abs(ours - theirs) <= 1e-6 * theirs
    assert abs(frechet_distance(*feature_statistics(f1), *feature_statistics(f1))) < 1e-8 * theirs

    # on images: features through torch-fidelity's extractor, then our statistics and distance = fid_kid's FID
    from distill.data import load_dataset

    a, b = load_dataset("mnist16", "heldout").x[:200], load_dataset("mnist16", "train").x[:300]
    ours = frechet_distance(*feature_statistics(compute_features(a)), *feature_statistics(compute_features(b)))
    theirs = fid_kid(a, b, kid_subset_size=100)["fid"]
    assert theirs > 1 and abs(ours - theirs) <= 1e-6 * theirs


class _Recording:
    """A teacher whose denoiser calls are recorded (x, t, cond)."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def denoise(self, x, t, cond=None):
        self.calls.append((x.clone(), torch.as_tensor(t).clone(), None if cond is None else cond.clone()))
        return self.teacher.denoise(x, t, cond)

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def first_inputs(self):
        """x and labels of the first call of every solve: every solve starts at the largest time, once."""
        t_max = max(float(t.max()) for _, t, _ in self.calls)
        return [(x, cond) for x, t, cond in self.calls if float(t.max()) == t_max]


class _EulerStudent:
    """A stand-in for students.load_student(path): k steps of the teacher's Euler solver."""

    def __init__(self, teacher):
        self.teacher = teacher

    def sample(self, noise, steps, cond=None):
        return sample(self.teacher, noise, solver="euler", nfe=steps, cond=cond)


class _MeanMetric:
    reference_id = "stub"

    def __call__(self, x, labels=None):
        return {"fid": float(x.abs().mean())}

    def check(self, n):
        pass

    def data_kinds(self):
        return []


def test_every_cell_starts_from_the_same_noise_and_labels(tmp_path, digit_teacher):
    teacher = _Recording(load_teacher(digit_teacher))
    cells = plan_cells(["euler", "dpmpp_2m", "heun"], [1, 3], ["euler-student"], [2])
    assert len(cells) == 7
    cfg = BenchConfig(num_samples=12, seed=7, batch_size=5)
    rows = run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path / "a", students={"euler-student": _EulerStudent(teacher)})
    assert {(r["method"], r["kind"], r["nfe"]) for r in rows} >= {("euler-student", "student", "2"), ("heun", "solver", "3")}
    firsts = teacher.first_inputs()
    assert len(firsts) == len(cells) * 3  # batches of 5, 5, 2
    per_cell = [(torch.cat([x for x, _ in firsts[i:i + 3]]), torch.cat([c for _, c in firsts[i:i + 3]]))
                for i in range(0, len(firsts), 3)]
    x_T = per_sample_noise(teacher.data_shape, range(7, 19))  # the discrete VP teacher starts at scale 1
    for x, cond in per_cell:
        assert torch.equal(x, x_T) and torch.equal(cond, torch.arange(12) % 10)

    teacher.calls.clear()  # another batch size: the same noise
    run_bench(teacher, cells[:1], BenchConfig(num_samples=12, seed=7, batch_size=12), _MeanMetric(), tmp_path / "b")
    (x, cond), = teacher.first_inputs()
    assert torch.equal(x, x_T)


def test_stochastic_cells_draw_their_step_noise_per_sample():
    assert {"ddpm", "dpmpp_2m_sde", "euler"} <= set(parse_solvers("all"))
    assert "euler" in parse_solvers("deterministic") and "ddpm" not in parse_solvers("deterministic")
    teacher = load_teacher("gmm:ring8")
    (cell,) = plan_cells(["dpmpp_2m_sde"], [4])
    torch.manual_seed(0)  # the global RNG plays no part
    a, _ = generate(teacher, cell, BenchConfig(num_samples=6, seed=3, batch_size=4, unconditional=True))
    torch.manual_seed(1)
    b, _ = generate(teacher, cell, BenchConfig(num_samples=6, seed=3, batch_size=6, unconditional=True))
    c, _ = generate(teacher, cell, BenchConfig(num_samples=3, seed=6, batch_size=3, unconditional=True))  # samples 3..5 alone
    assert torch.equal(a, b) and torch.equal(a[3:], c)
    (det,) = plan_cells(["dpmpp_2m"], [4])
    ode, _ = generate(teacher, det, BenchConfig(num_samples=6, seed=3, unconditional=True))
    assert not torch.allclose(a, ode, atol=1e-3)  # the step noise was used


def test_analytic_teacher_gets_exact_metrics(tmp_path):
    out = tmp_path / "gmm"
    _bench().main(["--teacher", "gmm:aniso2d", "--solvers", "euler,dpmpp_2m", "--nfe", "2,6", "--grid", "logsnr", "--final", "clean",
                   "--num-samples", "64", "--reference-steps", "40", "--seed", "3", "--out", str(out)])
    rows = _rows(out)
    cell = {(r["method"], int(r["nfe"])): r for r in rows if r["kind"] == "solver"}
    assert set(cell) == {("euler", 2), ("euler", 6), ("dpmpp_2m", 2), ("dpmpp_2m", 6)}
    for r in cell.values():
        assert r["fid"] == "" and r["labels"] == "cycle" and r["reference_id"] == "exact-ode-rk4-40"
        assert float(r["ode_rmse"]) > 0 and float(r["swd"]) > 0 and float(r["nll"]) == float(r["nll"])
    assert float(cell["dpmpp_2m", 6]["ode_rmse"]) < 0.5 * float(cell["dpmpp_2m", 2]["ode_rmse"])
    # the same numbers as the exact solver benchmark on the same problem (labels 0, 1, 2 in turn)
    teacher = load_teacher("gmm:aniso2d")
    problem = make_problem(teacher, 64, 3, 40, cond=torch.arange(64) % 3)
    want = run_cell(problem, "dpmpp_2m", 6)
    for key in ("ode_rmse", "swd", "nll"):
        assert float(cell["dpmpp_2m", 6][key]) == pytest.approx(want[key], rel=1e-5)
    (floor,) = [r for r in rows if r["kind"] == "floor"]
    assert float(floor["swd"]) == pytest.approx(want["swd_floor"], rel=1e-5) and floor["nll"] != ""
    assert (out / "fid_vs_nfe.png").stat().st_size > 10_000


@pytest.fixture
def rgb_teacher(tmp_path):
    from diffusers import DDPMScheduler

    return save_teacher_folder(tmp_path / "rgb", tiny_unet(channels=3), DDPMScheduler())


@pytest.mark.parametrize("args,message", [
    (["--solvers", "euler,ddim"], r"unknown solver 'ddim'; valid solvers: .*dpmpp_2m, .*dpmpp_2m_sde, .*euler, .*heun"),
    (["--nfe", "1,two"], r"cannot parse --nfe '1,two': expected comma-separated positive integers"),
    (["--nfe", "0,2"], r"cannot parse --nfe '0,2'"),
    (["--teacher", "RGB", "--reference-dataset", "hf:cifar10"], r"needs --inception-weights PATH"),
    (["--teacher", "RGB", "--reference-dataset", "hf:cifar10", "--inception-weights", "nope.pth"], r"no Inception weights file"),
    (["--teacher", "RGB"], r"3-channel images: measure it with torch-fidelity's Inception"),
    (["--teacher", "mnist16", "--num-samples", "2001", "--fid-cache", "CACHE"],
     r"has 2000 images, fewer than the 2001 samples per cell; allowed: --num-samples up to 2000"),
    (["--teacher", "mnist16", "--reference", "test"], r"unknown mnist16 split 'test'; allowed: train, heldout, reference, floor, tune"),
])
def test_bench_bad_input_exits_with_a_sentence(tmp_path, rgb_teacher, args, message):
    base = {"--teacher": "gmm:ring8", "--nfe": "2", "--num-samples": "8", "--out": str(tmp_path / "x")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = str(rgb_teacher) if v == "RGB" else str(tmp_path / "cache") if v == "CACHE" else v
    with pytest.raises(SystemExit, match=message):
        _bench().main([a for kv in base.items() for a in kv])
    assert not (tmp_path / "x").exists()


def _student_file(path, metadata=None):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata or {})
    return str(path)


COST = {"steps": 4000, "batch_size": 64, "wall_seconds": 5580, "hardware": "1 CPU thread", "teacher_nfe": 512000,
        "trained_params": 652449}


def test_student_cost_comes_from_the_file_then_the_cost_option_then_a_sidecar(tmp_path):
    import json

    cli = _bench()
    own = _student_file(tmp_path / "own.safetensors", {"training_cost": json.dumps(COST)})
    (tmp_path / "other.json").write_text(json.dumps({**COST, "steps": 1}))
    assert cli.student_cost(own, str(tmp_path / "other.json")) == COST  # the file's own record wins
    bare = _student_file(tmp_path / "bare.safetensors")
    assert cli.student_cost(bare, None) == {}
    (tmp_path / "bare.cost.json").write_text(json.dumps({**COST, "steps": 2}))
    assert cli.student_cost(bare, None)["steps"] == 2  # the sidecar beside the file
    assert cli.student_cost(bare, str(tmp_path / "other.json"))["steps"] == 1  # --cost before the sidecar
    (tmp_path / "bad.json").write_text(json.dumps({"hours": 3}))
    with pytest.raises(ValueError, match=r"unknown cost keys \['hours'\]; allowed: steps, batch_size, wall_seconds, hardware"):
        cli.student_cost(bare, str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="no cost file at"):
        cli.student_cost(bare, str(tmp_path / "missing.json"))


def test_student_rows_carry_their_cost_and_the_cost_plot_draws_them(tmp_path, digit_teacher):
    from distill.eval.bench import markdown_table, plot_cost, read_bench_rows

    teacher = load_teacher(digit_teacher)
    cells = plan_cells(["euler"], [1, 2], ["euler-student"], [1, 2])
    columns = {"euler-student": {"student_path": "s.safetensors", **{f"cost_{k}": v for k, v in COST.items()}}}
    run_bench(teacher, cells, BenchConfig(num_samples=6, seed=0, batch_size=6), _MeanMetric(), tmp_path,
              students={"euler-student": _EulerStudent(teacher)}, student_columns=columns)
    rows = read_bench_rows(tmp_path / "fid_vs_nfe.csv")
    students = [r for r in rows if r["kind"] == "student"]
    assert len(students) == 2 and all(r["cost_teacher_nfe"] == "512000" and r["student_path"] == "s.safetensors" for r in students)
    assert all(r["cost_steps"] == "" for r in rows if r["kind"] == "solver")
    assert "`euler-student` (student)" in markdown_table(rows)
    assert plot_cost(rows, tmp_path / "cost.png", {"wall_seconds": 2520, "hardware": "1 CPU thread"})
    assert (tmp_path / "cost.png").stat().st_size > 10_000
    assert not plot_cost([r for r in rows if r["kind"] != "student"], tmp_path / "none.png")  # no costed student: no plot


class _DataRowsMetric(_MeanMetric):
    """Records the sizes the data rows are asked for and refuses sample counts above its pools' size."""

    def __init__(self, pool_size):
        self.pool_size, self.asked = pool_size, []

    def check(self, n):
        if n > self.pool_size:
            raise ValueError(f"fewer than the {n} samples per cell")

    def data_kinds(self):
        return ["floor", "training"]

    def data_row(self, kind, n):
        self.asked.append((kind, n))
        return {"method": kind, "fid": 1.0}


def test_floor_and_training_rows_share_the_cells_sample_count_and_reference(tmp_path, digit_teacher):
    teacher = load_teacher(digit_teacher)
    metric = _DataRowsMetric(pool_size=12)
    rows = run_bench(teacher, plan_cells(["euler"], [1]), BenchConfig(num_samples=9, seed=0, batch_size=9), metric, tmp_path)
    assert metric.asked == [("floor", 9), ("training", 9)]
    assert {(r["num_samples"], r["reference_id"], r["protocol"]) for r in rows} == {("9", "stub", "2")} and len(rows) == 3
    with pytest.raises(ValueError, match="fewer than the 13 samples per cell"):  # before any sampling
        run_bench(teacher, plan_cells(["euler"], [1]), BenchConfig(num_samples=13, seed=0), metric, tmp_path / "b")
    assert not (tmp_path / "b" / "fid_vs_nfe.csv").exists()


def test_rows_of_the_old_protocol_are_not_reused(tmp_path, digit_teacher):
    teacher = load_teacher(digit_teacher)
    cells, cfg = plan_cells(["euler"], [1]), BenchConfig(num_samples=4, seed=0, batch_size=4)
    (row,) = run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path)
    with open(tmp_path / "fid_vs_nfe.csv", "w", newline="") as f:  # the same cell, written before the protocol column
        w = csv.DictWriter(f, fieldnames=[k for k in row if k != "protocol"], extrasaction="ignore")
        w.writeheader()
        w.writerow(row)
    rows = run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path)
    assert [r["protocol"] for r in rows] == ["1", "2"]  # measured again under protocol 2, the old row marked as such


def test_paired_cli_compares_two_entries_on_the_same_seeds(tmp_path, digit_teacher, capsys):
    """scripts/paired.py: an entry against itself is a zero difference, tied; against another solver the FIDs are the
    bench's own cells' (same seeds, labels and reference); bad entries are refused in one sentence."""
    from conftest import load_script

    paired = load_script("paired").main
    out = tmp_path / "p.jsonl"
    base = ["--teacher", str(digit_teacher), "--num-samples", "20", "--batch-size", "8", "--resamples", "20", "--out", str(out)]
    assert paired([*base, "--a", "solver:euler@2", "--b", "solver:euler@2"]) == 0
    assert paired([*base, "--a", "solver:euler@2", "--b", "solver:euler@3"]) == 0
    same, other = (json.loads(line) for line in out.read_text().splitlines())
    assert same["delta"] == same["low"] == same["high"] == 0.0 and same["verdict"] == "tied with"
    assert other["low"] <= other["delta"] <= other["high"] and other["delta"] == pytest.approx(other["fid_a"] - other["fid_b"])
    _bench().main(["--teacher", str(digit_teacher), "--solvers", "euler", "--nfe", "2,3", "--num-samples", "20", "--batch-size",
                   "8", "--bootstrap", "10", "--out", str(tmp_path / "bench")])
    fids = {r["nfe"]: float(r["fid"]) for r in _rows(tmp_path / "bench") if r["kind"] == "solver"}
    assert (other["fid_a"], other["fid_b"]) == (pytest.approx(fids["2"], rel=1e-4), pytest.approx(fids["3"], rel=1e-4))
    with pytest.raises(SystemExit, match="is not solver:NAME@NFE or student:FILE@STEPS"):
        paired([*base, "--a", "solver:euler", "--b", "solver:euler@2"])


def test_a_cost_written_after_the_first_bench_reaches_the_skipped_rows(tmp_path, digit_teacher):
    """A student benched before its cost sidecar existed: rerunning the bench skips its cells (same settings) but
    brings their path and cost columns up to date, and leaves every measured value as it was."""
    from distill.eval.bench import read_bench_rows

    teacher = load_teacher(digit_teacher)
    cells = plan_cells([], [], ["euler-student"], [1, 2])
    students = {"euler-student": _EulerStudent(teacher)}
    cfg = BenchConfig(num_samples=6, seed=0, batch_size=6)
    run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path, students=students,
              student_columns={"euler-student": {"student_path": "s.safetensors"}})
    before = read_bench_rows(tmp_path / "fid_vs_nfe.csv")
    assert all(r["cost_steps"] == "" for r in before if r["kind"] == "student")
    columns = {"euler-student": {"student_path": "s.safetensors", **{f"cost_{k}": v for k, v in COST.items()}}}
    run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path, students=students, student_columns=columns)
    after = read_bench_rows(tmp_path / "fid_vs_nfe.csv")
    assert len(after) == len(before)
    for b, a in zip(before, after):
        if b["kind"] == "student":
            assert a["cost_teacher_nfe"] == "512000" and a["cost_hardware"] == str(COST["hardware"])
        assert all(a[k] == b[k] for k in b if not k.startswith("cost_"))


def test_a_student_file_written_over_is_measured_again_not_skipped(tmp_path, digit_teacher):
    """A retrained student saved under the same name: its cells are measured again (one row per cell, the new file's
    hash), where before the old FID stayed and only the cost columns moved to the new file's. Rows without the hash
    column (older CSVs) are kept as they are."""
    from distill.eval.bench import FIELDS, read_bench_rows
    from distill.eval.solver_error import write_rows

    teacher = load_teacher(digit_teacher)
    cells = plan_cells([], [], ["euler-student"], [1])
    cfg = BenchConfig(num_samples=6, seed=0, batch_size=6)

    def bench(sha, student):
        run_bench(teacher, cells, cfg, _MeanMetric(), tmp_path, students={"euler-student": student},
                  student_columns={"euler-student": {"student_path": "s.safetensors", "student_sha256": sha}})
        return [r for r in read_bench_rows(tmp_path / "fid_vs_nfe.csv") if r["kind"] == "student"]

    first = bench("aaa", _EulerStudent(teacher))
    assert len(first) == 1 and first[0]["student_sha256"] == "aaa"
    assert bench("aaa", _ShiftedStudent(teacher)) == first  # the same file: skipped, nothing measured
    again = bench("bbb", _ShiftedStudent(teacher))
    assert len(again) == 1 and again[0]["student_sha256"] == "bbb" and again[0]["fid"] != first[0]["fid"]
    rows = read_bench_rows(tmp_path / "fid_vs_nfe.csv")
    for r in rows:
        r["student_sha256"] = ""  # as a CSV from before the column
    write_rows(tmp_path / "fid_vs_nfe.csv", rows, FIELDS)
    legacy = bench("ccc", _EulerStudent(teacher))
    assert len(legacy) == 1 and legacy[0]["fid"] == again[0]["fid"] and legacy[0]["student_sha256"] == ""


class _ShiftedStudent(_EulerStudent):
    def sample(self, noise, steps=1, cond=None):
        return super().sample(noise, steps=steps, cond=cond) + 1.0
