"""Train the mnist16 classifier whose penultimate features define FID/KID for mnist16.

    python scripts/train_classifier.py --out teachers/zoo/mnist16_classifier.safetensors

Trains on the mnist16 training split (random 1-pixel shifts), reports held-out accuracy, and writes the
weights with the accuracy, the command and the hardware as safetensors metadata (plus a .json beside).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from distill.core.atomic import reports_write_errors, write_text, write_with
from distill.data import load_dataset
from distill.eval.fid import Mnist16Classifier


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (padding with the background value -1)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, dy:dy + 16, dx:dx + 16]


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error(f"--epochs and --batch-size must be at least 1, got {args.epochs} and {args.batch_size}")
    train, held = load_dataset("mnist16", "train"), load_dataset("mnist16", "heldout")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = Mnist16Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0 = time.time()
    bar = tqdm(total=steps, desc="classifier", mininterval=2)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(shift(train.x[idx], g)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        model.eval()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} held-out accuracy {accuracy(model, held.x, held.labels):.4f}",
              flush=True)
    bar.close()
    acc = accuracy(model, held.x, held.labels)
    meta = {"heldout_accuracy": f"{acc:.4f}", "heldout_size": str(len(held)), "train_size": str(len(train)),
            "command": "python scripts/train_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "seconds": f"{time.time() - t0:.0f}", "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_with(args.out, lambda tmp: save_file(state, str(tmp), metadata=meta))  # atomic (distill.core.atomic)
    write_text(args.out.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
