"""Griffe extension: a Google-style `Example:` section parses as `Examples:` (code), not as an admonition.

Griffe's Google parser knows `Examples:` only; under `Example:` (the project's docstring rule) the `>>>` lines
were read as markdown, i.e. nested blockquotes with the lines run together. tests/test_docs.py checks that
no example renders that way.
"""
import re

from griffe import Extension

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class ExampleSections(Extension):
    """Rename every `Example:` section heading to `Examples:` before the docstring is parsed."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
