"""Training from reelforge shards (staged Keye-VL recipe on DeepSpeed)."""

if __name__ != "reelforge.training":  # the folder is on sys.path (e.g. the repo is the cwd): refuse the short name
    raise ImportError("reelforge installs as one namespace: import reelforge.training, not training")
