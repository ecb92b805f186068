"""MkDocs hook: the docstrings' Sphinx roles (:mod:`x`, :func:`~x.y`...) shown as plain code, and their
literal-block markers ("... as follows::") as a colon."""

import re

_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(<code>)~?")
_LITERAL = re.compile(r"::(\s*</p>)")


def on_page_content(html, **kwargs):
    return _LITERAL.sub(r":\1", _ROLE.sub(r"\1", html))
