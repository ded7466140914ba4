"""The discriminator's BCE per sigma/alpha band and the density-ratio statistics the generator read, from a run's
metrics.jsonl (means over logged rows in step windows, rows whose window missed a band skipped); 2 log 2 = 1.386
is a head that cannot separate.

    python results/mnist16_fdistill30/bce_bands.py RUN_FOLDER [RUN_FOLDER ...] > results/mnist16_fdistill30/bce_bands.md
"""

import json
import sys
from pathlib import Path

WINDOWS = [(1, 250), (251, 500), (501, 750)]
print("| run | steps | gan_d | <0.2 | 0.2-1 | 1-5 | >=5 | real - fake logit | mean r | max weight |")
print("|---|---|---|---|---|---|---|---|---|---|")
for folder in sys.argv[1:]:
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    for lo, hi in WINDOWS:
        critic = [r for r in rows if r["network"] == "fake_score" and lo <= r["step"] <= hi and "gan_d" in r]
        gen = [r for r in rows if r["network"] == "student" and lo <= r["step"] <= hi and "ratio" in r]
        if not critic:
            continue
        mean = lambda rs, k: (lambda v: sum(v) / len(v))([r[k] for r in rs if r[k] == r[k]])  # noqa: E731  (NaN rows skipped)
        bands = " | ".join(f"{mean(critic, 'gan_d@' + b):.3f}" for b in ("<0.2", "0.2-1", "1-5", ">=5"))
        gap = sum(r["real_logit"] - r["fake_logit"] for r in critic) / len(critic)
        ratio = f"{mean(gen, 'ratio'):.3f} | {max(r['weight_max'] for r in gen):.3f}" if gen else "- | -"
        print(f"| {Path(folder).name} | {lo}-{hi} | {mean(critic, 'gan_d'):.3f} | {bands} | {gap:+.3f} | {ratio} |")
