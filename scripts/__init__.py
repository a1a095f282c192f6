"""Entry points users run (``pretrain.py``, the fine-tuning script) and, in ``scripts.bench``, the benchmarks.

A package so that ``python -m scripts.bench.<name>`` runs a benchmark from the repository root.
"""
