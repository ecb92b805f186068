"""MkDocs hook: the docstrings' Sphinx roles (:mod:`x`, :func:`x`...) shown as plain code."""

import re

_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
