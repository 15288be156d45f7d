"""The documentation site builds with warnings as errors, and its generated pages cover the code.

``mkdocs build --strict`` (mkdocs.yml: dead links, missing anchors and pages left out of the nav
are warnings, so errors) into a temporary folder, from this checkout; then every registered method
has its page and every run-config key (core and method keys) is in the configuration reference.
Needs the ``docs`` extra (``pip install -e ".[docs]"``); skips, saying so, without it.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_flwr.config import RunConfig
from fedlora_flwr.methods import registry

ROOT = Path(__file__).resolve().parent.parent


def _docs_tools_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocs_gen_files"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: install the docs extra (pip install -e \".[docs]\")"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _docs_tools_missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("site")
    # This checkout's packages first, whatever the environment's install points at.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_every_method_has_its_page(site: Path) -> None:
    for name, method in registry().items():
        page = site / "methods" / name / "index.html"
        assert page.is_file(), f"no page for method {name!r}"
        text = html.unescape(page.read_text(encoding="utf-8"))
        summary = " ".join((method.client.__doc__ or "").split())[:40]
        assert summary in " ".join(text.split()), f"{page}: the client docstring is not on the page"
        for info_name, info in method.params.model_fields.items():
            key = info.alias or info_name.replace("_", "-")
            assert f"<code>{key}</code>" in text, f"{page}: key {key!r} missing"


def test_every_config_key_is_in_the_reference(site: Path) -> None:
    text = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    keys = set(RunConfig.keys())
    for method in registry().values():
        keys |= method.params.keys()
    missing = sorted(key for key in keys if f"<code>{key}</code>" not in text)
    assert not missing, f"keys missing from the configuration reference: {missing}"


def test_every_page_is_in_the_nav(site: Path) -> None:
    # --strict already fails on a page left out of the nav; the method pages come from the nav hook.
    index = (site / "index.html").read_text(encoding="utf-8")
    for name in registry():
        assert f'href="methods/{name}/"' in index, f"method {name!r} is not in the nav"
