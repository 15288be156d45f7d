"""MkDocs hook: list every registered method's generated page under "Methods" in the nav.

``docs/_gen/pages.py`` writes ``methods/<name>.md`` for each method of
``fedlora_flwr.methods.registry()``; this hook adds the same names to the nav section that holds
``methods/index.md``, in registry order, so that the nav lists every page and a new method needs
no edit of ``mkdocs.yml``.
"""

from __future__ import annotations

from typing import Any


def _methods_section(nav: list[Any]) -> list[Any] | None:
    for item in nav:
        if isinstance(item, dict):
            for value in item.values():
                if isinstance(value, list):
                    if "methods/index.md" in value or any(
                            isinstance(entry, dict) and "methods/index.md" in entry.values() for entry in value):
                        return value
                    found = _methods_section(value)
                    if found is not None:
                        return found
    return None


def on_config(config: Any, **_: Any) -> Any:
    from fedlora_flwr.methods import registry

    section = _methods_section(config["nav"] or [])
    if section is None:
        raise ValueError("mkdocs.yml: no nav section lists methods/index.md")
    listed = {value for entry in section for value in (entry.values() if isinstance(entry, dict) else [entry])}
    section += [{name: f"methods/{name}.md"} for name in registry() if f"methods/{name}.md" not in listed]
    return config
