"""Reading results back: the rows of the current settings, values with their bootstrap spread, the teacher's
converged value, and the markdown table."""

from __future__ import annotations

import math

from distill.eval.bench.config import CONFIG_FIELDS, DATA_KINDS


def current_rows(rows: list[dict]) -> tuple[list[dict], dict[str, dict], int]:
    """The cell rows with the settings of the last cell row written, the data rows (``DATA_KINDS``) of the same
    settings by kind, and how many cell rows of other settings there are. Protocol 1 files kept their floor at its
    own size; their floor is matched without the sample count."""
    cells = [r for r in rows if r["kind"] not in DATA_KINDS]
    if not cells:
        return [], {}, len(rows)
    config = {k: cells[-1][k] for k in CONFIG_FIELDS}
    mine = [r for r in cells if all(r[k] == v for k, v in config.items())]
    loose = config["protocol"] == "1"
    data = {r["kind"]: r for r in rows if r["kind"] in DATA_KINDS
            and all(r[k] == v for k, v in config.items() if not (loose and k == "num_samples"))}
    return mine, data, len(cells) - len(mine)


def _value(row: dict, key: str) -> float:
    return float(row[key]) if row.get(key, "") != "" else math.nan


def with_spread(row: dict, key: str, digits: int = 1) -> str:
    """'12.3' or, with a bootstrap spread, '12.3 +- 0.4'."""
    text = f"{_value(row, key):.{digits}f}"
    return text + (f" +- {_value(row, key + '_std'):.{digits}f}" if row.get(key + "_std", "") != "" else "")


def converged(cells: list[dict], key: str = "fid") -> dict | None:
    """The teacher's converged value: the best solver at the largest NFE run."""
    solvers = [r for r in cells if r["kind"] == "solver"]
    if not solvers:
        return None
    top = max(int(r["nfe"]) for r in solvers)
    return min((r for r in solvers if int(r["nfe"]) == top), key=lambda r: _value(r, key))


def recommended_notes(cells: list[dict]) -> list[str]:
    """A line naming the solvers of the table run off the settings their registry entry recommends (``SolverSpec.
    recommended``: e.g. Heun on a uniform grid from a t_max at sigma/alpha ~ 2e4), why their cells look broken, and the
    --variant that runs them as recommended; [] when there are none."""
    from distill.solvers import SOLVERS

    off = {}
    for r in cells:
        spec = SOLVERS.get(r["method"]) if r["kind"] == "solver" else None
        if spec is not None and spec.recommended and r["grid"] != dict(spec.recommended).get("grid"):
            off[spec.name] = spec.recommended
    if not off:
        return []
    names = ", ".join(f"`{n}`" for n in off)
    options = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in next(iter(off.values())))
    return [f"Note: {names} ran here on the {cells[-1]['grid']} grid. Where t_max lies at an extreme noise level "
            "(sigma/alpha ~ 2e4 for a squared-cosine DiscreteVP such as mnist16's) their first step spans orders of "
            "magnitude and the samples blow up; their registry entries recommend a start at EDM's sigma_max on a Karras "
            f"grid: `--variant NAME_edm=NAME:{options}` (rows `*_edm` where benched).  ", ""]


def markdown_table(rows: list[dict], key: str | None = None) -> str:
    """A markdown table of ``key`` (default: fid, or swd for analytic teachers; '+-' the bootstrap spread): a row
    per solver, then per student, a column per NFE, '-' where a method has no cell; then the data rows."""
    cells, data, _ = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to tabulate")
    key = key or ("fid" if cells[0].get("fid", "") != "" else "swd")
    nfes = sorted({int(r["nfe"]) for r in cells})
    value = {(r["kind"], r["method"], int(r["nfe"])): r for r in cells}
    lines = [f"| {key} | " + " | ".join(f"{n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for kind in ("solver", "student"):
        for method in dict.fromkeys(r["method"] for r in cells if r["kind"] == kind):
            label = f"`{method}`" + (" (student)" if kind == "student" else "")
            vals = [value.get((kind, method, n)) for n in nfes]
            lines.append(f"| {label} | " + " | ".join("-" if r is None else with_spread(r, key) for r in vals) + " |")
    lines.append("")
    lines += recommended_notes(cells)
    for row in data.values():
        if row.get(key, "") != "":
            lines.append(f"{row['method']} ({row['num_samples']} samples): {with_spread(row, key, 2)}  ")
    return "\n".join(lines) + "\n"
