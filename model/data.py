"""The default model's data recipe lives in the package (llmos_edge/recipe.py): on-device consolidation replays the
same generator. This shim keeps the build scripts' `from data import ...` working without the package installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmos_edge.recipe import *  # noqa: F403
from llmos_edge.recipe import _apply_case, _heldout_faq_combos  # noqa: F401
