"""The kinds of shared vectors, one module each: ``sdpa``, ``mha``, ``causal``.

A kind module holds everything about its vectors: the case dataclass and the case list, ``build_inputs``
(deterministic inputs from a case), ``expectations`` (the float64 oracle's values), ``magnitude`` (the
gradient term size the tolerance policy scales by), the runners of every implementation, ``applies`` and,
last, ``KIND = Kind(...)`` (:class:`compare.kinds.base.Kind`). What all kinds share (``Kind``,
``Vector``, dtypes and array conversions) is in :mod:`compare.kinds.base`, which imports no kind.

To add a kind: write ``compare/kinds/<kind>.py`` ending in ``KIND = Kind(...)`` and add it to the tuple
in ``compare/registry.py`` (one line). A kind imports ``compare.kinds.base``, ``compare.oracle`` and
``compare.tolerance`` as it needs, never ``compare.vectors``, ``compare.registry`` or another kind, so
nothing imports in a circle (``tests/test_import_graph.py`` checks).
"""
