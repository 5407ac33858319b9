"""The two templates a job file holds: the prompt's {column} fields and output_dir's {date}."""

from __future__ import annotations

import string


def template_fields(template: str) -> list[str]:
    """The {column} names a prompt template uses, in order, each once."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"prompt_template is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name or any(c in name for c in ".[]"):
            raise ValueError(f"prompt_template field {{{name}}} must name a column, e.g. {{text}}")
        if spec or conv:
            raise ValueError(f"prompt_template field {{{name}}} may not use format specs or conversions")
        if name not in names:
            names.append(name)
    return names


def fill_date(template: str, day: str) -> str:
    """Replace `{date}` and nothing else: no attribute access, indexing, conversions or format specs
    (str.format would run `{date.__class__}` or grow `{date:>99999999}` to gigabytes)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"output_dir is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from exc
    pieces = []
    for literal, name, spec, conversion in parsed:
        pieces.append(literal)
        if name is None:
            continue
        if name != "date" or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"output_dir may only use the {{date}} placeholder, not {field}")
        pieces.append(day)
    return "".join(pieces)
