"""Benchmarks of kd_experiments: modules run from the checkout as ``python -m benchmarks.<name>``.

They are not tests: each writes ``benchmarks/results/<name>.json`` through
:mod:`benchmarks.harness` (one locked, resumable writer; per-record provenance), and
``python -m benchmarks.report`` turns those files into the pages under ``docs/results/``.
"""
