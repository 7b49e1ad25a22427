"""Filters: each marks samples it rejects with a step name and a reason code."""

if __name__ != "reelforge.filters":  # the folder is on sys.path (e.g. the repo is the cwd): refuse the short name
    raise ImportError("reelforge installs as one namespace: import reelforge.filters, not filters")
