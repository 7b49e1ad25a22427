"""`python -m training STAGE.yaml [...]` = `reelforge train STAGE.yaml [...]` (for launchers)."""

import sys

from reelforge.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
