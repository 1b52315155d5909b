"""Griffe extension for the docs build: reST bits of rmsjax docstrings to Markdown.

The docstrings follow the Google layout but write maths and cross references the reST way
(so that they read well in ``help()`` and in doctests). mkdocstrings renders Markdown, so
this extension rewrites, before parsing:

* ``.. math::`` blocks to ``$$ ... $$`` (rendered by pymdownx.arithmatex + MathJax);
* ``:math:`x``` to ``$x$``;
* ``:func:`f```, ``:class:`C```, ``:mod:`m```, ``:meth:`...``` and ``:data:`...``` to code.

It only changes what the documentation site shows; the source is untouched.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj):`~?([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            indent = line[: len(line) - len(stripped)]
            first = stripped[len(".. math::"):].strip()
            body = [first] if first else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            content = [b for b in body if b]
            out.append(f"{indent}$$")
            out.extend(f"{indent}{b}" for b in content)
            out.append(f"{indent}$$")
            out.append("")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _doctest_blocks(text: str) -> str:
    """Fences each doctest session (``>>>`` lines and their output) as a ``pycon`` block.

    Unfenced, an output line such as ``[0.1, 0.05]`` reads as a Markdown reference link.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _doctest_blocks(_math_blocks(text))
    text = _INLINE_MATH.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        if "{shared}" in obj.docstring.value:
            # rmsjax.compat.keras completes these docstrings at import time (the arguments all
            # Keras optimizers share): document the imported object's docstring.
            module, _, name = obj.path.rpartition(".")
            obj.docstring.value = inspect.getdoc(getattr(importlib.import_module(module), name))
        obj.docstring.value = rst_to_markdown(obj.docstring.value)
