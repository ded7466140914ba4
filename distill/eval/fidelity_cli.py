"""torch-fidelity's own command line with the mnist16 feature extractor registered.

    python -m distill.eval.fidelity_cli --input1 runs/bench/images/euler_nfe4 --input2 runs/bench/images/reference \
        --fid --kid --feature-extractor mnist16-classifier --cpu

(also installed as ``fewstep-fidelity``). The folders are what ``scripts/bench.py --save-images`` writes: one PNG per
sample of each cell, and ``images/reference`` with the reference split the bench measures against, so the bench's FID
and KID of a cell can be reproduced by torch-fidelity itself. Every other option is torch-fidelity's (``--help``). Its
DataLoader workers are capped at the cores this process may use (``distill.eval.fid.sized_fidelity_loaders``).
"""

from __future__ import annotations

import sys

from distill.eval.fid import register_mnist16_extractor, sized_fidelity_loaders


def main(argv: list[str] | None = None) -> int:
    from torch_fidelity.fidelity import main as fidelity_main

    register_mnist16_extractor()  # before torch-fidelity builds its parser: its --feature-extractor choices come from the registry
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    with sized_fidelity_loaders():
        fidelity_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
