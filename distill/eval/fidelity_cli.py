"""torch-fidelity's own command line with the mnist16 feature extractor registered.

    python -m distill.eval.fidelity_cli --input1 runs/bench/images/euler_nfe4 --input2 runs/bench/images/reference \
        --fid --kid --feature-extractor mnist16-classifier --cpu

(also installed as ``fewstep-fidelity``). The folders are what ``scripts/bench.py --save-images`` writes: one PNG per
sample of each cell, and ``images/reference`` with the reference split the bench measures against, so the bench's FID
and KID of a cell can be reproduced by torch-fidelity itself. Every other option is torch-fidelity's (``--help``). Its
DataLoader workers are capped at the cores this process may use (``distill.eval.fid.sized_fidelity_loaders``).
"""

from __future__ import annotations

import argparse
import sys

from distill.engine.paths import check_output_dir
from distill.eval.fid import register_mnist16_extractor, sized_fidelity_loaders


def check_output_folders(argv: list[str]) -> None:
    """The folders torch-fidelity writes, checked before it computes anything (``check_output_dir``): ``--cache-root``
    (features and statistics, written after they are computed) unless ``--no-cache``, and ``--datasets-root`` (its
    dataset downloads) unless ``--no-datasets-download``."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--cache-root")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--datasets-root")
    p.add_argument("--no-datasets-download", action="store_true")
    known, _ = p.parse_known_args(argv)
    if known.cache_root is not None and not known.no_cache:
        check_output_dir(known.cache_root, "--cache-root")
    if known.datasets_root is not None and not known.no_datasets_download:
        check_output_dir(known.datasets_root, "--datasets-root")


def main(argv: list[str] | None = None) -> int:
    from torch_fidelity.fidelity import main as fidelity_main

    try:
        check_output_folders(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    register_mnist16_extractor()  # before torch-fidelity builds its parser: its --feature-extractor choices come from the registry
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    with sized_fidelity_loaders():
        fidelity_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
