"""The benchmarks, one module per measurement, sharing ``common`` (shapes from ``configs/``, the library's
defaults, the environment record, the interleaved timer, result files) and ``render`` (result file to markdown).

Run each from the repository root: ``python -m scripts.bench.<name> --help``.
"""
