"""A job file read: YAML or JSON plus overrides, validated, with one message naming the file and field."""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.settings.model import Endpoint, GenerationOptions, Host, JobSettings, SettingsError, SqlInput, SqlSink


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_document(path: Path, what: str) -> Any:
    """Parse a file the user named, JSON (.json) or YAML; a failure is one message naming `what` and the file."""
    kind = "JSON" if path.suffix == ".json" else "YAML"
    if not path.is_file():
        raise SettingsError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"{what} {path} is not valid {kind}: {exc}") from exc
    except ValueError as exc:  # YAML reads `2026-02-30` as a date, and Python's date() refuses it
        raise SettingsError(f"{what} {path} holds a date that does not exist (run_date?): {exc}") from exc


def load_settings(job_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobSettings:
    """Read a YAML job file, apply overrides (nested dicts merge), validate.

    Relative paths stay relative to the working directory, which a deployment's pull step
    sets to the project root.
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if job_file is not None:
        path = Path(job_file)
        loaded = read_document(path, "job file")
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"job file {path} must hold a mapping of settings, not {type(loaded).__name__}")
        data = loaded or {}
        source = str(path)
    data = merge_overrides(data, overrides or {})
    try:
        return JobSettings.model_validate(data)
    except ValidationError as exc:
        # Without a job file every value is an override: saying so would only repeat "in overrides".
        said: dict[str, list[str]] = {}
        for err in exc.errors():
            where, what = _describe(err, overrides or {} if job_file is not None else {})
            said.setdefault(where, []).append(what)
        # A union's members each refuse the value (in_flight: a number, or 'auto'): one line, "or" between.
        problems = "; ".join(f"{where}: {', or '.join(whats)}" for where, whats in said.items())
        # `from None`: pydantic's own text repeats each input value, and a refused URI may hold a password.
        raise SettingsError(f"invalid job settings in {source}: {problems}") from None


def host_settings(job_file: str | Path | None, overrides: dict[str, Any] | None, host: Host) -> JobSettings:
    """A scale-out host's settings, the job's with its own overrides: checked before any shard starts, a
    problem naming the host (its overrides are in the hosts list, not the job file)."""
    try:
        return load_settings(job_file, merge_overrides(overrides or {}, host.settings_overrides()))
    except SettingsError as exc:
        raise SettingsError(f"host {host.queue}: {exc}") from None


def is_text_setting(key: str) -> bool:
    """Whether the dotted setting `key` takes text (or a path): `--set` passes its value as typed, where
    YAML would cut `Answer #1 only` at its comment, refuse `a: b`, make `{summary}` a mapping or `yes` a bool."""
    model: type[BaseModel] = JobSettings
    *parents, leaf = key.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,)] if field else []
        found = [a for a in nested if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return False
        model = found[0]
    field = model.model_fields.get(leaf)
    if field is None:
        return False
    kinds = [a for a in typing.get_args(field.annotation) or (field.annotation,) if a is not type(None)]
    return bool(kinds) and all(kind in (str, Path) for kind in kinds)


_NESTED: dict[str, type[BaseModel]] = {
    "options": GenerationOptions,
    "endpoints": Endpoint,
    "input_sql": SqlInput,
    "sink": SqlSink,
}


def _overridden(loc: tuple[Any, ...], overrides: dict[str, Any]) -> bool:
    """Whether the value at `loc` came from an override (--set, a deployment's overrides), not the file."""
    node: Any = overrides
    for part in loc:
        if not isinstance(node, dict):
            return True  # an override set the whole value the error is inside of
        if part not in node:
            return False
        node = node[part]
    return bool(loc)


_UNION_TAGS = {"int", "str", "float", "bool", "none", "list", "dict"}


def _setting_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The setting an error is about, without pydantic's union member tags ('constrained-int', "literal['auto']")."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or "-" in p or p in _UNION_TAGS)))


def _describe(err: Any, overrides: dict[str, Any]) -> tuple[str, str]:
    """One validation problem in the job file's words, as (setting, what is wrong); an unknown key gets
    the closest known one, and a value an override set says so (the user would search the file for it)."""
    # An unknown key is the user's own spelling (`in-flight`): only a value's error carries union member tags.
    loc = tuple(err["loc"]) if err["type"] == "extra_forbidden" else _setting_loc(err["loc"])
    where = ".".join(str(p) for p in loc) or "(settings)"
    if _overridden(loc, overrides):
        where += " (from an override)"
    if err["type"] != "extra_forbidden":
        return where, err["msg"]
    *parents, key = [p for p in loc if isinstance(p, str)]
    model: type[BaseModel] = _NESTED.get(parents[-1], JobSettings) if parents else JobSettings
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else f"; known keys: {', '.join(model.model_fields)}"
    return where, f"unknown setting{hint}"
