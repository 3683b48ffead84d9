"""MkDocs hook: the reference pages, generated at build time from the pydantic models and the
registries (``orchestrator.docs_reference``). Nothing is written under ``docs/``: each page is
added to the build's files in memory."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from orchestrator.docs_reference import PAGES


def on_files(files: Files, config: Any) -> Files:
    """Add every generated reference page to the site's files."""
    for path, write in PAGES.items():
        files.append(File.generated(config, path, content=write()))
    return files
