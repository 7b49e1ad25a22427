"""Spark jobs and the `reelforge` command line."""

if __name__ != "reelforge.jobs":  # the folder is on sys.path (e.g. the repo is the cwd): refuse the short name
    raise ImportError("reelforge installs as one namespace: import reelforge.jobs, not jobs")
