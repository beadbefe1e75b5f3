"""Benchmarks (see bench.mk and BENCHMARKS.md), and the simulated board they and the tests share."""
