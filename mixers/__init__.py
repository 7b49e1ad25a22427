"""Mixtures: token-budget planning, stage recipes and the cold-start mode renderers."""

if __name__ != "reelforge.mixers":  # the folder is on sys.path (e.g. the repo is the cwd): refuse the short name
    raise ImportError("reelforge installs as one namespace: import reelforge.mixers, not mixers")
