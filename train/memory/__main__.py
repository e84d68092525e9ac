"""`python -m train.memory ...`: the estimator, `--measure` and the planner (train/memory/cli.py)."""
import sys

from train.memory.cli import main

sys.exit(main())
