"""The main job on the embedded default: consistency-distil the mnist16 teacher, export the student, and
plot it against the training-free solvers. No GPU, no download; about 12 minutes on 2 CPU cores.

    python scripts/demo.py [--out runs/demo] [--max-steps 800] [--num-samples 1000]

Stages (each is one of the project's scripts, shown as it runs; a stage already done is skipped, so an
interrupted demo continues where it stopped):
1. scripts/distill.py --config configs/distill/cd_mnist16.yaml, shortened (batch 32, --max-steps steps)
2. scripts/export.py -> OUT/student.safetensors
3. scripts/tune_steps.py: the 2-step sampling time by a greedy FID search on the tune split
4. scripts/bench.py: the student at 1 and 2 steps against euler, dpmpp_2m and unipc at NFE 1, 2, 4, 8
   (--num-samples per cell, class-conditional) -> OUT/bench/fid_vs_nfe.{csv,png}
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(title: str, args: list[str]) -> None:
    print(f"\n== {title}\n$ python {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"== {title}: {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder of the run, the student and the plot")
    p.add_argument("--max-steps", type=int, default=800, help="consistency distillation steps (batch 32)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per benchmark cell")
    p.add_argument("--tune-samples", type=int, default=500, help="samples per schedule tried by the sampling-time search")
    p.add_argument("--solvers", default="euler,dpmpp_2m,unipc")
    p.add_argument("--nfe", default="1,2,4,8")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.num_samples < 2:
        print(f"error: need --max-steps >= 1 and --num-samples >= 2, got {args.max_steps} and {args.num_samples}", file=sys.stderr)
        return 2
    out = args.out if args.out.is_absolute() else ROOT / args.out
    run, student = out / "cd", out / "student.safetensors"
    t0 = time.perf_counter()
    try:
        if not (run / "student.safetensors").is_file():
            stage("1/4 consistency distillation", ["scripts/distill.py", "--config", "configs/distill/cd_mnist16.yaml",
                                                   "--set", "batch_size=32", "checkpoint_every=200", "log_every=50",
                                                   "--max-steps", str(args.max_steps), "--output-dir", str(run),
                                                   "--resume", "latest"])
        if not student.is_file():
            stage("2/4 export", ["scripts/export.py", str(run), "--out", str(out / "student_untuned.safetensors")])
            stage("3/4 sampling times", ["scripts/tune_steps.py", str(out / "student_untuned.safetensors"), "--out", str(student),
                                         "--max-steps", "2", "--num-samples", str(args.tune_samples), "--candidates", "8"])
        stage("4/4 FID vs NFE", ["scripts/bench.py", "--teacher", "mnist16", "--solvers", args.solvers, "--nfe", args.nfe,
                                 "--students", str(student), "--student-steps", "1,2", "--num-samples", str(args.num_samples),
                                 "--out", str(out / "bench")])
    except subprocess.CalledProcessError as e:
        print(f"error: stage failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s: {out / 'bench' / 'fid_vs_nfe.png'} and fid_vs_nfe.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
