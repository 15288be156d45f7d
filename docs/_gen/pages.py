"""Generate the per-method pages and the configuration reference at build time (mkdocs-gen-files).

Nothing here restates what the code says: every page is built from

- ``fedlora_flwr.methods.registry()``: each :class:`Method`'s client docstring (the method's math,
  numpy-style), its ``params`` pydantic model (key, type, default, bounds, description), its
  strategy and its ``requires``;
- ``fedlora_flwr.config.RunConfig.model_fields``: every core run-config key;
- a hand-written page's ``<!-- docstring: module.or.object -->`` line becomes that object's
  docstring (the concept pages quote the modules that implement each concept).

``docs/_gen/nav.py`` (a MkDocs hook) lists the same method pages in the nav.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from typing import Any

import annotated_types
import mkdocs_gen_files
import tomli_w

from fedlora_flwr.config import OPERATIONAL_KEYS, RunConfig
from fedlora_flwr.methods import Method, registry

# -- rendering helpers -------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|obj):`~?([^`]+)`")
_SECTION = re.compile(r"^(Parameters|Returns|Notes|References|Examples|See Also)\n-{3,}$", re.M)


def cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def rst_to_markdown(text: str) -> str:
    """The reST of this project's docstrings as Markdown: roles and ``literals`` as code, ``::``
    literal blocks as fenced code blocks."""
    text = _ROLE.sub(r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            stripped = line.rstrip()[:-2].rstrip()
            if stripped:
                out.append(stripped + ":")
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            body = inspect.cleandoc("\n".join(block))
            out += ["", "```text", body, "```", ""]
            continue
        # Markdown starts a list only after a blank line; reST docstrings often omit it.
        if line.startswith("- ") and out and out[-1].strip() and not out[-1].startswith(("- ", " ")):
            out.append("")
        out.append(line)
        i += 1
    return "\n".join(out)


def split_docstring(doc: str) -> tuple[str, str, dict[str, str]]:
    """(summary, body, parameter entries by key) of a numpy-style docstring."""
    doc = inspect.cleandoc(doc or "")
    parts = _SECTION.split(doc)
    main, sections = parts[0], dict(zip(parts[1::2], parts[2::2]))
    summary, _, body = main.strip().partition("\n\n")
    entries: dict[str, str] = {}
    name = None
    for line in sections.get("Parameters", "").splitlines():
        if line and not line.startswith((" ", "\t")):
            names, _, _kind = line.partition(" : ")
            name = names.strip()
            entries[name] = ""
        elif name is not None:
            entries[name] = (entries[name] + " " + line.strip()).strip()
    return " ".join(summary.split()), body.strip(), entries


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{tomli_w.dumps({'v': value})[4:].strip()}`" for value in typing.get_args(annotation))
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def default_value(info: Any) -> str:
    value = info.get_default(call_default_factory=True)
    return f"`{tomli_w.dumps({'v': value})[4:].strip()}`"


_BOUNDS = ((annotated_types.Gt, "gt", "> {}"), (annotated_types.Ge, "ge", "≥ {}"),
           (annotated_types.Lt, "lt", "< {}"), (annotated_types.Le, "le", "≤ {}"))


def bounds(info: Any) -> str:
    found = []
    for constraint in info.metadata:
        for kind, attribute, template in _BOUNDS:
            if isinstance(constraint, kind):
                found.append(template.format(getattr(constraint, attribute)))
    return ", ".join(found)


def key_of(name: str, info: Any) -> str:
    return info.alias or name.replace("_", "-")


def qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# -- the method pages --------------------------------------------------------------------------

_REQUIREMENT_TEXT = {
    "head": "a model with a body `features()` and a declared classification head",
    "batchnorm": "BatchNorm layers",
    "decomposable": "conv/linear layers that the σ + B·A decomposition applies to",
    "image_backbone": "reads an image `backbone` (other methods refuse one)",
    "model_family": "accepts a `model-family` (its uploads do not depend on the architecture)",
}


def requirements_text(method: Method) -> list[str]:
    requires = method.requires
    lines = [f"data: {', '.join(requires.modalities)}",
             {"never": "pretrained model: never (trains from scratch)",
              "optional": "pretrained model: optional",
              "required": "pretrained model: required (a pretrained encoder or an image `backbone`)"}[requires.pretrained]]
    lines += [text for attribute, text in _REQUIREMENT_TEXT.items() if getattr(requires, attribute)]
    if not requires.bf16:
        lines.append("float32 only (`precision = \"bf16\"` is refused)")
    return lines


def evaluation_text(method: Method) -> str:
    """The method's paper evaluation point (``evaluate-at = "default"``) and the others it can mean."""
    others = [point for point in method.points if point != method.evaluate_at]
    can = f"; also {', '.join(f'`{point}`' for point in others)} and `both`" if others else "; no other point"
    link = "[evaluation points](../concepts/strategies.md#evaluation-points)"
    return f"`{method.evaluate_at}` by default (the paper's){can} ({link})"


def first_paragraph(cls: type) -> str:
    """The first paragraph of a class's own docstring, else of its module's (a class may rely on it)."""
    doc = cls.__dict__.get("__doc__") or getattr(inspect.getmodule(cls), "__doc__", None) or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def method_page(method: Method) -> str:
    client = method.client
    summary, body, documented = split_docstring(client.__doc__ or "")
    strategy_summary = first_paragraph(method.strategy)
    out = [f"# `{method.name}`", "", rst_to_markdown(summary), ""]
    out += ["| | |", "|---|---|",
            f"| client | `{qualified(client)}` |",
            f"| strategy | `{qualified(method.strategy)}`{': ' if strategy_summary else ''}"
            f"{cell(rst_to_markdown(strategy_summary))} |",
            f"| own keys | `{qualified(method.params)}` |",
            f"| needs | {cell('; '.join(requirements_text(method)))} |",
            f"| evaluated | {evaluation_text(method)} |", ""]
    out += ["*Generated from the method's client docstring and parameter model "
            "(`fedlora_flwr.methods.registry()`); edit those, not this page.*", ""]
    if body:
        out += ["## The method", "", rst_to_markdown(body), ""]
    out += ["## Parameters", ""]
    fields = method.params.model_fields
    if fields:
        out += ["Run-config keys of this method (validated only when it runs; "
                "see [the configuration reference](../reference/configuration.md#method-keys)).", "",
                "| key | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, info in fields.items():
            key = key_of(name, info)
            description = info.description or ""
            note = next((text for names, text in documented.items()
                         if key in [part.strip() for part in names.split(",")]), "")
            if note and note.rstrip(".") != description.rstrip("."):
                description = f"{description}<br>*Docstring:* {note}" if description else note
            out.append(f"| `{key}` | {type_name(info.annotation)} | {default_value(info)} | {bounds(info)} "
                       f"| {cell(rst_to_markdown(description))} |")
        out.append("")
    else:
        note = next(iter(documented), "")
        out += [f"No keys of its own{': ' + cell(rst_to_markdown(note)) if note and not note.startswith('None') else ''}: "
                "the run's [core keys](../reference/configuration.md#core-keys) only.", ""]
    return "\n".join(out)


# -- the configuration reference ---------------------------------------------------------------


def configuration_page(methods: dict[str, Method]) -> str:
    out = ["# Configuration reference", "",
           "*Generated from `fedlora_flwr.config.RunConfig` and each method's parameter model; "
           "edit those, not this page.* How to set keys, and what the main ones mean for an experiment: "
           "[Configure a run](../guide/configure.md).", "",
           "## Core keys", "",
           "Every run validates these (`fedlora_flwr.config.RunConfig`). *Changes results: no* marks keys that "
           "only change where or how long a run goes, or what it logs: runs that differ only in them are the same "
           "experiment, and `resume` may change them.", "",
           "| key | type | default | bounds | changes results | description |", "|---|---|---|---|---|---|"]
    for name, info in RunConfig.model_fields.items():
        if info.exclude:
            continue
        key = key_of(name, info)
        changes = "no" if key in OPERATIONAL_KEYS else "yes"
        out.append(f"| `{key}` | {type_name(info.annotation)} | {default_value(info)} | {bounds(info)} | {changes} "
                   f"| {cell(rst_to_markdown(info.description or ''))} |")
    readers: dict[str, list[str]] = {}
    fields: dict[str, Any] = {}
    for method in methods.values():
        for name, info in method.params.model_fields.items():
            key = key_of(name, info)
            readers.setdefault(key, []).append(method.name)
            fields.setdefault(key, info)
    out += ["", "## Method keys", "",
            "Each method's own keys (its `params` model): validated only when that method runs; a run of another "
            "method accepts them and does not read them. A method from another package takes its keys in "
            "`method-params`.", "",
            "| key | type | default | description | read by |", "|---|---|---|---|---|"]
    for key in sorted(readers):
        info = fields[key]
        read_by = ", ".join(f"[`{name}`](../methods/{name}.md)" for name in readers[key])
        out.append(f"| `{key}` | {type_name(info.annotation)} | {default_value(info)} "
                   f"| {cell(rst_to_markdown(info.description or ''))} | {read_by} |")
    out.append("")
    return "\n".join(out)


def methods_table(methods: dict[str, Method]) -> str:
    out = ["| method | summary |", "|---|---|"]
    for method in methods.values():
        summary, _, _ = split_docstring(method.client.__doc__ or "")
        out.append(f"| [`{method.name}`]({method.name}.md) | {cell(rst_to_markdown(summary))} |")
    return "\n".join(out) + "\n"


_MARKER = re.compile(r"^<!-- docstring: ([\w.]+) -->$", re.M)


def docstring_of(dotted: str) -> str:
    """The docstring of a module, or of an object in one (``package.module.Object``), as Markdown."""
    doc = inspect.getdoc(import_object(dotted))
    if not doc:
        raise ValueError(f"docs: {dotted} has no docstring")
    return f"*From the docstring of `{dotted}`:*\n\n" + rst_to_markdown(doc)


_MEMBERS = re.compile(r"^<!-- members: ([\w.]+)(?:: ([\w, ]+))? -->$", re.M)


def import_object(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ValueError(f"docs: cannot import {dotted}")


def members_table(dotted: str, names: str | None) -> str:
    """A table of a class's methods (its own public ones, or ``names``) with signature and docstring."""
    cls = import_object(dotted)
    chosen = ([name.strip() for name in names.split(",")] if names else
              [name for name, value in vars(cls).items() if inspect.isfunction(value) and not name.startswith("_")])
    out = [f"*Generated from `{dotted}`.*", "", "| hook | what it does |", "|---|---|"]
    for name in chosen:
        function = getattr(cls, name)
        arguments = [parameter.name for parameter in inspect.signature(function).parameters.values()
                     if parameter.name not in ("self", "cls")]
        doc = inspect.getdoc(function) or ""
        out.append(f"| `{name}({', '.join(arguments)})` | {cell(rst_to_markdown(doc))} |")
    return "\n".join(out)


def expand_docstring_markers() -> None:
    for file in mkdocs_gen_files.files:
        if not file.src_uri.endswith(".md"):
            continue
        with mkdocs_gen_files.open(file.src_uri, "r") as page:
            text = page.read()
        if _MARKER.search(text) or _MEMBERS.search(text):
            text = _MARKER.sub(lambda match: docstring_of(match.group(1)), text)
            text = _MEMBERS.sub(lambda match: members_table(match.group(1), match.group(2)), text)
            with mkdocs_gen_files.open(file.src_uri, "w") as page:
                page.write(text)


def main() -> None:
    expand_docstring_markers()
    methods = registry()
    for method in methods.values():
        with mkdocs_gen_files.open(f"methods/{method.name}.md", "w") as page:
            page.write(method_page(method))
    with mkdocs_gen_files.open("methods/list.md", "w") as page:
        page.write("# All methods\n\n*Generated from `fedlora_flwr.methods.registry()`: every registered method "
                   "(built in, or from an installed package's entry point) and its client docstring's first "
                   "sentence.*\n\n" + methods_table(methods))
    with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
        page.write(configuration_page(methods))


main()
