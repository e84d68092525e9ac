"""`python -m train.study SPEC ...`: plan, run or report a study (train/study/run.py)."""
import sys

from train.study.run import main

sys.exit(main())
