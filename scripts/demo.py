"""The main job on the embedded default: consistency-distil the mnist16 teacher with the recommended parameterization,
choose and tune the student on tune data, bench it against the training-free solvers, and judge it with paired
intervals. No GPU, no download; about 15 minutes on 2 idle CPU cores.

    python scripts/demo.py [--out runs/demo] [--max-steps 800] [--num-samples 1000]

Stages (each is one of the project's scripts, shown as it runs; a stage already done is skipped, so an
interrupted demo continues where it stopped):
1. scripts/distill.py --config configs/distill/cd_mnist16.yaml with student.parameterization=consistency_edm,
   shortened (batch 32, --max-steps steps, EMA decay 0.99), on two single-thread CPU ranks where two cores are usable
2. scripts/export.py (raw and EMA weights) and scripts/select_student.py: the one with the lower 1-step FID on the
   tune split (training digits no reported number uses, on tune noise seeds), recorded in the file
3. scripts/tune_steps.py: the 2-step sampling time by a greedy FID search on the tune split -> OUT/student.safetensors
4. scripts/bench.py: the student at 1 and 2 steps against ddpm, deis, dpmpp_2m and unipc at NFE 1, 2, 4 (the best
   solvers at those NFE in results/mnist16) and unipc at 8 (the teacher converged here), --num-samples per cell,
   class-conditional -> OUT/bench/fid_vs_nfe.{csv,png}
5. scripts/paired_bench.py on the same seeds: each student step count against the best solver at every NFE up to 4
   and the 2-step student against the 1-step one, with 95% paired intervals -> OUT/paired/paired.md
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = 5
FULL_RECIPE = ("results/mnist16/students/README.md: cd_edm_mnist16 (4,000 steps of batch 64, about 65 minutes on one "
               "CPU thread) and cd_edm_ln_mnist16; every student against the solvers: results/mnist16_paired/paired.md")


def stage(k: int, title: str, *commands: list[str]) -> None:
    """Run the stage's commands (each a python argument list) in order, showing each, then the stage's wall time."""
    print(f"\n== {k}/{STAGES} {title}", flush=True)
    t0 = time.perf_counter()
    for args in commands:
        print(f"$ python {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"== {k}/{STAGES} {title}: {time.perf_counter() - t0:.0f} s", flush=True)


def launcher() -> list[str]:
    """Two single-thread CPU ranks where two cores are usable (global batch unchanged, ~1.7x the steps per second of
    one rank), else one process; the port is a free one, so a demo beside another launch does not collide."""
    if len(os.sched_getaffinity(0)) < 2:
        return []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
            "--main_process_port", str(port)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder of the run, the student and the results")
    p.add_argument("--max-steps", type=int, default=800, help="consistency distillation steps (batch 32)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per benchmark cell and paired entry")
    p.add_argument("--tune-samples", type=int, default=500, help="samples per candidate of the selection and time search")
    p.add_argument("--solvers", default="ddpm,deis,dpmpp_2m,unipc", help="the solvers benched at --nfe")
    p.add_argument("--nfe", default="1,2,4")
    p.add_argument("--teacher-nfe", type=int, default=8, help="unipc at this NFE: the teacher converged of the bench")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.num_samples < 2 or args.tune_samples < 2 or args.teacher_nfe < 1:
        print(f"error: need --max-steps >= 1, --num-samples >= 2, --tune-samples >= 2 and --teacher-nfe >= 1, got "
              f"{args.max_steps}, {args.num_samples}, {args.tune_samples} and {args.teacher_nfe}", file=sys.stderr)
        return 2
    out = args.out if args.out.is_absolute() else ROOT / args.out
    run, student, chosen = out / "cd", out / "student.safetensors", out / "student_untuned.safetensors"
    n = str(args.num_samples)
    t0 = time.perf_counter()
    try:
        if not (run / "student.safetensors").is_file():
            stage(1, "consistency distillation", [
                *launcher(), "scripts/distill.py", "--config", "configs/distill/cd_mnist16.yaml", "--set", "batch_size=32",
                "student.parameterization=consistency_edm", "ema_decay=0.99", "checkpoint_every=200", "log_every=50",
                "--max-steps", str(args.max_steps), "--output-dir", str(run), "--resume", "latest"])
        if not chosen.is_file():
            raw, ema = out / "student_raw.safetensors", out / "student_ema.safetensors"
            stage(2, "export and choose raw or EMA weights on tune data",
                  ["scripts/export.py", str(run), "--out", str(raw)], ["scripts/export.py", str(run), "--ema", "--out", str(ema)],
                  ["scripts/select_student.py", "--teacher", "mnist16", "--steps", "1", "--candidates", str(raw), str(ema),
                   "--num-samples", str(args.tune_samples), "--out", str(chosen)])
        if not student.is_file():
            stage(3, "sampling times", ["scripts/tune_steps.py", str(chosen), "--out", str(student), "--max-steps", "2",
                                        "--num-samples", str(args.tune_samples), "--candidates", "8"])
        bench = ["scripts/bench.py", "--teacher", "mnist16", "--num-samples", n, "--out", str(out / "bench")]
        stage(4, "FID vs NFE", [*bench, "--solvers", args.solvers, "--nfe", args.nfe, "--students", str(student),
                                "--student-steps", "1,2"], [*bench, "--solvers", "unipc", "--nfe", str(args.teacher_nfe)])
        stage(5, "paired verdicts", ["scripts/paired_bench.py", "--bench", str(out / "bench"), "--num-samples", n,
                                     "--max-nfe", str(args.teacher_nfe), "--cache", str(out / "paired_cache"),
                                     "--out", str(out / "paired")])
    except subprocess.CalledProcessError as e:
        print(f"error: stage failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s: the plot {out / 'bench' / 'fid_vs_nfe.png'}, the leaderboard "
          f"and the verdicts {out / 'paired' / 'paired.md'}.\nGoing further, the full-budget recipe and its result: {FULL_RECIPE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
