"""The report: plain data (dataclasses of numbers), its JSON form and its checks; no torch.

``from gradscope.report import Report, StepRecord, ...``: every public name of ``report.report``.
"""

from gradscope.report.report import *  # noqa: F403
