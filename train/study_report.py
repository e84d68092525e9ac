"""Deprecated alias: the study report moved to train/study/report.py (python -m train.study.report STUDY_DIR).

`python -m train.study_report STUDY_DIR` keeps working; importing train.study_report gives train.study.report
(whose namespace still holds fit_power_law and PowerLawFit, now defined in train.study.fit).
"""
import sys
import warnings

from train.study import report as _report

if __name__ == "__main__":
    sys.exit(_report.main())
warnings.warn("train.study_report is deprecated: import train.study.report (and train.study.fit)", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _report  # the same module object: its private names and monkeypatching work as before
