"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023): ``ems`` (the empirical model statistics, computed once per teacher) and
``solver`` (the solver that reads them, registered with the solver suite)."""
