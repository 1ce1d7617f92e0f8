"""The package is ready to publish: metadata, licence, changelog, and docs that stay inside the repository."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import aiod4p
from aiod4p._install import install_hint

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_license_file_matches_the_declared_license() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_project_urls_and_the_changelog() -> None:
    assert set(PROJECT["urls"]) >= {"Repository", "Documentation", "Changelog"}
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{PROJECT['version']}]" in changelog and "## [Unreleased]" in changelog
    assert aiod4p.__version__ == PROJECT["version"]


def test_markdown_links_stay_inside_the_repository() -> None:
    """Every relative link of the README and docs/ names a file of the repository."""
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name} links {target}"


def test_install_commands_work_from_a_clone() -> None:
    """aiod4p is not on PyPI: no page or message tells users to `pip install 'aiod4p[...]'`."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "aiod4p").rglob("*.py"))]
    for page in pages:
        assert not re.search(r"pip install 'aiod4p\[\w+\]'", page.read_text()), page  # the PyPI form
    assert install_hint("mpi") == f"{sys.executable} -m pip install -e '.[mpi]' in a clone of aiod4p"
