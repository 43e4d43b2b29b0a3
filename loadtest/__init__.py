"""Load tests and benchmarks: simulated clients against a real server (see README, Performance)."""
