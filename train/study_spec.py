"""Deprecated alias: the study spec moved to train/study/spec.py; import train.study.spec instead."""
import sys
import warnings

from train.study import spec as _spec

warnings.warn("train.study_spec is deprecated: import train.study.spec", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _spec  # the same module object: its private names and monkeypatching work as before
