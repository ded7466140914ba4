"""Evaluation: exact metrics for analytic teachers, plots; FID/KID sweeps land here too."""
