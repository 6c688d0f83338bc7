"""Data problems found while scoring: one loud warning per kind, listing its first examples."""

import logging
from typing import List

logger = logging.getLogger(__name__)


def report_problems(warnings: List[str], summary: str, examples: List[str], limit: int = 5) -> None:
    """Log ``summary`` with the first ``limit`` examples as one warning and append it to ``warnings``.

    Nothing happens when ``examples`` is empty.
    """
    if not examples:
        return
    more = f"; ... and {len(examples) - limit} more" if len(examples) > limit else ""
    message = f"{summary}: {'; '.join(examples[:limit])}{more}"
    logger.warning(message)
    warnings.append(message)
