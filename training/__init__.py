"""Training from reelforge shards (staged Keye-VL recipe on DeepSpeed)."""
