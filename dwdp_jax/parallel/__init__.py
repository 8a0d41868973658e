"""Parallel strategies: DWDP (this package's subject), and the DEP and replicated-DP baselines."""
