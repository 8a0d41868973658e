"""`python -m experiments.launch`: the launcher's entry point (see the package docstring)."""

from experiments.launch import run

run()
