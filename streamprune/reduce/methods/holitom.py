"""`holitom`: the registry entry of HoliTom's outer stages (the algorithm lives in `streamprune.reduce.holitom`;
its inner-LLM merge is `--inner holitom`)."""

from __future__ import annotations

from streamprune.reduce.holitom import DEFAULT_BETA, DEFAULT_KNN, DEFAULT_MAX_WINDOW, holitom_reduce
from streamprune.reduce.methods.base import PRE_LLM, Method

# tau None: the authors' 0.8, or 0.65 at retain ≤ 0.1
PAPER = "Shao et al., HoliTom: Holistic Token Merging for Fast Video Large Language Models, NeurIPS 2025 (arXiv 2505.21334)"
DEFAULTS = {"tau": None, "beta": DEFAULT_BETA, "knn": DEFAULT_KNN, "max_window": DEFAULT_MAX_WINDOW}

METHOD = Method("holitom", PAPER, (PRE_LLM,), holitom_reduce, DEFAULTS)
