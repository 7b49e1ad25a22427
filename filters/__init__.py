"""Filters: each marks samples it rejects with a step name and a reason code."""
