"""AMED (Zhou et al., CVPR 2024): ``predictor`` (the time predictor, its file and its training) and ``solver`` (AMED-Solver
and the AMED-Plugins, registered with the solver suite)."""
