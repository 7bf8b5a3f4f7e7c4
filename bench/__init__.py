"""Benchmarks: scripts that print a table and write JSON, each with its baseline in the same run.
Never timing assertions in tests. The index (benchmark, command, what it measures, CPU or GPU)
and every dated result: docs/benchmarks.md.
"""
