"""Mixtures: token-budget planning, stage recipes and the cold-start mode renderers."""
