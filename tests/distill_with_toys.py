"""scripts/distill.py with the test objectives registered: ``accelerate launch tests/distill_with_toys.py ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_objectives  # noqa: E402,F401  (registers the test objectives)
from conftest import load_script  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(load_script("distill").main())
