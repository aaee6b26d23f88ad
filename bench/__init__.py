"""Benchmarks of the sweeper against the usual ways of running the same sweep (see README.md)."""
