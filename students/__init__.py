"""Student networks and their parameterizations (consistency boundary condition, k-step sampling).

Empty until the distillation engine lands: students are defined by DESIGN.md, contract 5.
"""
