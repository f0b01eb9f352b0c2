"""Benchmarks (not tests): each prints a table against torch and writes JSON under bench/results/."""
