"""Spark jobs and the `reelforge` command line."""
