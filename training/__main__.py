"""`python -m reelforge.training STAGE.yaml [...]` = `reelforge train STAGE.yaml [...]` (for launchers)."""

import sys

from reelforge.training.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
