"""Benchmarks of ct_kernels against their peers; ``python -m benchmarks`` runs them all."""
