"""``python -m compare bench``: jit-compiled XLA against eager torch, measured one way for everyone.

Layout of the package (each thing exists once):

- :mod:`compare.bench.flops`: the one FLOP formula.
- :mod:`compare.bench.timing`: the one timing loop (warm-up, median/IQR, device sync).
- :mod:`compare.bench.presets`: the benchmark cases (``Case``) and the quick / full / gpu sweeps.
- :mod:`compare.bench.impls`: the implementation table (name, framework, family, builder, applicability).
- :mod:`compare.bench.worker`: runs ONE framework's jobs in its own process with pinned threads.
- :mod:`compare.bench.runner`: the parent: spawns one worker per framework, collects JSON lines, ratios.
- :mod:`compare.bench.report`: ``bench.json``, ``bench.md``, ``bench.png``, ``bench_ratio.png``.
- :mod:`compare.bench.cli`: ``add_parser(subparsers)`` and ``run(args)`` for ``python -m compare``.
"""
