"""Benchmarks for mmmod: every kernel and the whole step against the paper's code.

Run one with ``python -m benchmarks.<name> [--quick|--smoke]`` or all of them with
``python -m benchmarks.run_all [--quick]``. Results land in ``benchmarks/results/``.
Contenders, on the same inputs in the same run:

(a) ``paper``  the official OGM-GE code's eager algorithm (:mod:`benchmarks.paper_eager`)
(b) ``plain``  the best plain-torch rewrite we could write (:mod:`benchmarks.plain_torch`)
(c) ``torch``  mmmod's reference backend
(d) every fused mmmod backend live on the machine (``cpu``, ``cuda``, ``triton``)
"""
