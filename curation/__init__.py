"""Curation: the sample schema, source readers, probing, dedup, shards and the ledger."""

if __name__ != "reelforge.curation":  # the folder is on sys.path (e.g. the repo is the cwd): refuse the short name
    raise ImportError("reelforge installs as one namespace: import reelforge.curation, not curation")
