"""The harness where the twins meet: the float64 oracle, shared vectors, tolerance policy, runners and
the ``python -m compare`` command."""
