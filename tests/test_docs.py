"""The documentation site builds without a warning, and the README's links into it hold.

``mkdocs build --strict`` turns every warning into an error: a docstring that names a
parameter its signature does not have, a page missing from the navigation, a broken link
or anchor, a snippet whose file is gone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the packages the build needs (the ``docs`` extra of setup.cfg)
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_tools() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def test_site_builds_strict(tmp_path):
    missing = _missing_tools()  # they are test dependencies: a missing one is a failure
    assert not missing, (
        f"documentation tools not installed ({', '.join(missing)}): "
        "pip install -e .[test] (or .[docs]) to build the site"
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about mkdocs 2
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "extensions" / "index.html").is_file()


def _readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def test_readme_links_point_to_files():
    """Relative links in the README name files of the repository (the docs pages, plots)."""
    links = [link for link in _readme_links() if "://" not in link]
    assert any(link.startswith("docs/") for link in links), "the README links into docs/"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_stays_short():
    """The README is what a newcomer needs first; everything else lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
