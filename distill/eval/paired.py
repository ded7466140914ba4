"""Paired comparison of two bench entries (a solver at an NFE, or a student at a step count) on the same noise seeds:
each is sampled exactly as its bench cell (``distill.eval.bench.generate``: sample i from seed ``seed + i`` with label
i mod K), measured with the bench's FID features, and FID(a) - FID(b) gets a bootstrap interval over the same resampled
seeds (``distill.eval.fid.paired_fid_delta``), the class counts held fixed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.eval.bench.cells import Cell, generate
from distill.eval.bench.config import BenchConfig, labels_for
from distill.eval.fid import feature_statistics, frechet_distance, paired_fid_delta


@dataclass
class Entry:
    """A bench entry: ``kind`` 'solver' (``method`` a solver name, ``n`` its NFE) or 'student' (``method`` its label,
    ``student`` the loaded student, ``n`` its step count)."""

    kind: str
    method: str
    n: int
    student: object = None
    path: str | None = None  # the student file (its folder holds the parents of a chain: ``check_student``'s ``near``)

    @property
    def label(self) -> str:
        return f"{self.method} ({self.n} {'NFE' if self.kind == 'solver' else 'steps'})"

    def cell(self) -> Cell:
        return Cell(self.method, self.kind, self.n, self.n)


def parse_entry(text: str, load_student) -> Entry:
    """``solver:NAME@NFE`` or ``student:FILE@STEPS`` (``load_student(FILE)`` loads the file)."""
    kind, _, rest = text.partition(":")
    what, _, n = rest.rpartition("@")
    if kind not in ("solver", "student") or not what or not n.isdigit() or int(n) < 1:
        raise ValueError(f"entry {text!r} is not solver:NAME@NFE or student:FILE@STEPS (a positive count)")
    if kind == "solver":
        return Entry("solver", what, int(n))
    return Entry("student", what.rsplit("/", 1)[-1].removesuffix(".safetensors"), int(n), load_student(what), what)


def feature_bench(teacher, texts: list[str], num_samples: int, seed: int, batch_size: int, load_student):
    """(entries, BenchConfig, metric) for commands that sample entries as their bench cells and read FID features:
    each entry parsed, each student checked against the teacher (as the bench does), an analytic teacher refused."""
    from distill.eval.bench import check_student, make_metric

    entries = [parse_entry(t, load_student) for t in texts]
    cfg = BenchConfig(num_samples=num_samples, seed=seed, batch_size=batch_size)
    cfg.validate(teacher)
    for e in entries:
        if e.student is not None:
            check_student(teacher, e.method, e.student, near=Path(e.path).parent)
    metric = make_metric(teacher, cfg)
    if not hasattr(metric, "ref_features"):
        raise ValueError(f"teacher {teacher.name!r} is analytic: its bench measures exact metrics, not FID features")
    return entries, cfg, metric


def compare(teacher, cfg: BenchConfig, metric, a: Entry, b: Entry, *, resamples: int = 200) -> dict:
    """FID(a) - FID(b) with its paired interval and verdict, both FIDs, and what was compared."""
    features = [metric.features(generate(teacher, e.cell(), cfg, e.student)[0]) for e in (a, b)]
    labels = labels_for(teacher, cfg, 0, cfg.num_samples)
    out = paired_fid_delta(*features, metric.ref_features, resamples=resamples, seed=cfg.seed, strata=labels)
    ref = feature_statistics(metric.ref_features)
    fid_a, fid_b = (frechet_distance(*feature_statistics(f), *ref) for f in features)
    return {"a": a.label, "b": b.label, "fid_a": fid_a, "fid_b": fid_b, **out, "num_samples": cfg.num_samples,
            "seed": cfg.seed, "resamples": resamples}
