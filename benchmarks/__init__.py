"""Benchmark scripts of sar_backbones and the helpers they share (not part of the package).

``timing`` (interleaved timing, machine record, report files), ``parts`` (per-part
time and MACs of a backbone) and ``latency`` (the batch-1 latency benchmark behind
``tools/analysis/benchmark_latency.py``); the scripts next to them write into ``results/``.
"""
