"""Sphinx configuration of the reference documentation (``sphinx-build -W docs build/docs``).

The pages are Markdown (MyST); the API page renders the public names' docstrings with
autodoc. scripts/docs.sh builds it with warnings as errors, in CI through scripts/test.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # document this checkout's ranks, installed or not

import ranks  # noqa: E402

project = "ranks"
release = ranks.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
python_use_unqualified_type_names = True
# Command lines (--gpus, --torch-dist) keep their two hyphens.
smartquotes = False
html_theme = "alabaster"
html_theme_options = {"page_width": "1100px", "sidebar_width": "220px"}
html_static_path = ["_static"]
html_css_files = ["wrap.css"]
