"""The trajectory report: one self-contained HTML file for one trajectory or a whole run.

- :mod:`thyme.report.items`   report items from run / replay / eval outputs
- :mod:`thyme.report.render`  the page (jinja2 template, embedded images, highlighted code)
- :mod:`thyme.report.plots`   matplotlib figures as PNG data URLs
- :mod:`thyme.report.pages`   pages with plots: an eval's summary, two evals compared, RL training curves

Crop regions and the target-box measure live in :mod:`thyme.scoring.crops`.

Above data / evaluate / train; below the cli. Must not import the cli.
"""

from .items import MAX_IMAGE_SIDE, ReportError, ReportItem, answers_agree, load_items, load_provenance, to_item
from .pages import is_eval_folder, is_training_folder, write_comparison, write_summary, write_training
from .render import report_source, write_report

__all__ = [
    "MAX_IMAGE_SIDE",
    "ReportError",
    "ReportItem",
    "answers_agree",
    "is_eval_folder",
    "is_training_folder",
    "load_items",
    "load_provenance",
    "report_source",
    "to_item",
    "write_comparison",
    "write_report",
    "write_summary",
    "write_training",
]
