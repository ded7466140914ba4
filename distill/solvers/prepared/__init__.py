"""Prepared samplers: training-free samplers that first prepare something for one teacher (a Gaussian fit, DPM-Solver-v3
statistics, an AMED predictor, a GITS grid). One subpackage each, its preparation and its solver side by side;
``files`` ties every prepared file to its teacher by content hash.

The subpackages' ``__init__`` files import nothing, so the solver registry can import their solver modules while
their preparation modules import the registry."""
