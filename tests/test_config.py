"""Job settings: YAML + overrides, every bad field named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.bootstrap import BootstrapError, gpu_limits
from flows.cli import parse_overrides
from tasks.settings.fingerprint import answer_differences
from tasks.settings.load import load_settings
from tasks.settings.model import JobSettings, SettingsError
from tasks.settings.template import template_fields

BASE = {"input_path": "in.parquet", "prompt_template": "Score {text}", "output_dir": "out"}
LEGACY_FINGERPRINT = "3d412d82556a52e9"  # BASE's answer_fingerprint("d1", "{}") before structured_output existed


def test_yaml_and_overrides_merge(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input_path: a.csv\nprompt_template: 'Hi {name}'\noutput_dir: o\noptions:\n  num_ctx: 8192\n")
    settings = load_settings(job, {"options": {"num_predict": 32}, "in_flight": 4})
    assert settings.options.num_ctx == 8192 and settings.options.num_predict == 32
    assert settings.in_flight == 4 and settings.chunk_size == 5000 and settings.keep_alive == -1
    assert settings.template_fields == ["name"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"in_flight": 1000}, "in_flight"),
        ({"options": {"num_predict": 0}}, "options.num_predict"),
        ({"options": {"temperature": 5}}, "options.temperature"),
        ({"colour": "red"}, "colour"),
        ({"backend": "vllm"}, "backend"),
        ({"keep_alive": "forever"}, "keep_alive"),
        ({"name": "Has Spaces"}, "name"),
        ({"prompt_template": "Score {text"}, "prompt_template"),
        ({"prompt_template": "Score {text!r}"}, "prompt_template"),
        ({"gpus": []}, "gpus"),
        ({"gpus": [-1]}, "gpus.0"),
    ],
)
def test_bad_field_is_named(override: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(None, {**BASE, **override})


def test_a_problem_an_override_made_says_so(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input_path: a.csv\nprompt_template: 'Hi {name'\noutput_dir: o\n")
    with pytest.raises(SettingsError) as info:
        load_settings(job, {"chunk_sise": 8, "options": {"temprature": 1}})
    said = str(info.value)
    assert said.startswith(f"invalid job settings in {job}: "), said
    assert "chunk_sise (from an override): unknown setting; did you mean `chunk_size`?" in said
    assert "options.temprature (from an override): unknown setting" in said
    assert "prompt_template: " in said and "prompt_template (from an override)" not in said  # the file's own


def test_a_union_setting_is_one_problem_in_the_settings_words() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(None, {**BASE, "in_flight": 0})
    assert str(info.value) == (
        "invalid job settings in overrides: in_flight: Input should be greater than or equal to 1, "
        "or Input should be 'auto'"
    )


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ({"in-flight": 4}, "in-flight: unknown setting; did you mean `in_flight`?"),
        ({"options": {"num-ctx": 8192}}, "options.num-ctx: unknown setting; did you mean `num_ctx`?"),
    ],
)
def test_a_hyphenated_unknown_key_is_named_as_written(override: dict, said: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(None, {**BASE, **override})
    assert said in str(info.value)


def test_set_values_of_text_settings_are_taken_as_typed() -> None:
    overrides = parse_overrides(
        [
            "system_prompt=Answer #1 only",  # YAML: a comment, cut to 'Answer'
            "prompt_template={summary}",  # YAML: a mapping
            "model=yes",  # YAML: true
            "id_column=0123",  # YAML: 123
            "trim_field=null",  # null still unsets, as does an empty value
            "output_schema=",
            "options.num_ctx=8192",
            "in_flight=auto",
            "options.stop=[END, STOP]",
        ]
    )
    assert overrides == {
        "system_prompt": "Answer #1 only",
        "prompt_template": "{summary}",
        "model": "yes",
        "id_column": "0123",
        "trim_field": None,
        "output_schema": None,
        "options": {"num_ctx": 8192, "stop": ["END", "STOP"]},
        "in_flight": "auto",
    }


def test_cross_field_checks() -> None:
    with pytest.raises(SettingsError, match="ollama_host is set but backend is 'llamacpp'"):
        load_settings(None, {**BASE, "backend": "llamacpp", "ollama_host": "http://x:11434"})
    with pytest.raises(SettingsError, match="model_path is set but backend is 'ollama'"):
        load_settings(None, {**BASE, "backend": "ollama", "model_path": "m.gguf"})


def test_job_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input_path: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(listy)
    missing = tmp_path / "missing_fields.yaml"
    missing.write_text("input_path: a.csv\n")
    with pytest.raises(SettingsError, match=r"output_dir: Field required"):
        load_settings(missing)
    missing.write_text("input_path: a.csv\noutput_dir: out\n")  # only an OpenAI batch file brings its messages
    with pytest.raises(SettingsError, match=r"prompt_template is required"):
        load_settings(missing)


def test_template_fields_and_keep_alive_forms() -> None:
    assert template_fields("{a} and {b} then {a} {{literal}}") == ["a", "b"]
    for value in (-1, 0, 300, "10m", "1h30m", "45s"):
        assert load_settings(None, {**BASE, "keep_alive": value}).keep_alive == value


def test_fingerprint_tracks_answers_not_plumbing() -> None:
    a = load_settings(None, BASE)
    assert a.answer_fingerprint("d1", None) == load_settings(None, {**BASE, "in_flight": 8}).answer_fingerprint(
        "d1", None
    )
    assert a.answer_fingerprint("d1", None) != a.answer_fingerprint("d2", None)
    changed = load_settings(None, {**BASE, "options": {"temperature": 0.7}})
    assert a.answer_fingerprint("d1", None) != changed.answer_fingerprint("d1", None)


def test_structured_output_owns_the_directory_and_grammar_keeps_old_fingerprints() -> None:
    auto = load_settings(None, BASE)
    grammar = load_settings(None, {**BASE, "structured_output": "grammar"})
    validate = load_settings(None, {**BASE, "structured_output": "validate"})
    assert auto.structured_output == "auto" and auto.backend_sampling == "off"
    fingerprints = {s.answer_fingerprint("d1", "{}") for s in (auto, grammar, validate)}
    assert len(fingerprints) == 3  # a grammar or the schema in the prompt: other answers
    # What the version before the setting computed for BASE (the engine always got the grammar then):
    # a directory it left is resumed with structured_output: grammar.
    assert grammar.answer_fingerprint("d1", "{}") == LEGACY_FINGERPRINT
    differ = answer_differences(grammar.model_dump(mode="json"), validate.model_dump(mode="json"))
    assert differ == ["structured_output: 'grammar' -> 'validate'"]
    # Backend sampling is plumbing: greedy answers are the same with it (test_openai_backend shows it).
    sampled = load_settings(
        None, {**BASE, "backend": "openai", "base_url": "http://h/v1", "model": "m", "backend_sampling": "auto"}
    )
    unsampled = load_settings(None, {**sampled.model_dump(mode="json"), "backend_sampling": "off"})
    assert sampled.answer_fingerprint("d1", None) == unsampled.answer_fingerprint("d1", None)


def test_backend_sampling_on_needs_a_server_that_can() -> None:
    with pytest.raises(SettingsError, match="backend_sampling 'on' is a llama.cpp server's"):
        load_settings(None, {**BASE, "backend": "ollama", "backend_sampling": "on"})
    with pytest.raises(SettingsError, match="structured_output"):
        load_settings(None, {**BASE, "structured_output": "json"})


def test_output_dir_takes_the_run_date() -> None:
    from datetime import date

    settings = load_settings(None, {**BASE, "output_dir": "out/nightly/{date}"})
    assert str(settings.for_run_date(date(2026, 11, 26)).output_dir) == "out/nightly/2026-11-26"
    with pytest.raises(SettingsError, match="output_dir may only use the {date} placeholder"):
        load_settings(None, {**BASE, "output_dir": "out/{night}"})
    # A rerun on a later day names the night it finishes; run_date does not change the answers.
    later = load_settings(None, {**BASE, "output_dir": "out/nightly/{date}", "run_date": "2026-11-26"})
    assert later.run_date == date(2026, 11, 26)
    assert later.answer_fingerprint("d", None) == settings.answer_fingerprint("d", None)


@pytest.mark.parametrize("bad", ["out/{date.__class__.__mro__}", "out/{date:>99999999}", "out/{date!r}", "out/{when}"])
def test_output_dir_expands_only_date(bad: str) -> None:
    with pytest.raises(SettingsError, match=r"output_dir may only use the \{date\} placeholder, not \{"):
        load_settings(None, {"input_path": "in.csv", "prompt_template": "{text}", "output_dir": bad})


def test_an_unset_model_is_labelled_by_what_runs(tmp_path: Path) -> None:
    base = {"input_path": "in.csv", "prompt_template": "{text}", "output_dir": str(tmp_path)}
    assert JobSettings.model_validate(base).model == "gemma-3-270m-q4_k_m"  # the default GGUF, not an Ollama tag
    gguf = {**base, "model_path": str(tmp_path / "sha256-abc" / "qwen2.5-7b-q4.gguf")}
    assert JobSettings.model_validate(gguf).model == "qwen2.5-7b-q4"
    assert JobSettings.model_validate({**base, "backend": "ollama"}).model == "gemma3:12b"
    assert JobSettings.model_validate({**gguf, "model": "mine"}).model == "mine"


def test_the_bootstrap_names_a_deployed_job_that_does_not_load(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input_path: a.csv\nprompt_template: 'Hi {name}'\noutput_dir: o\nchunk_sise: 8\n")
    config = {"deployments": [{"name": "nightly", "parameters": {"job_file": str(job)}}]}
    with pytest.raises(BootstrapError, match=r"deployment nightly: invalid job settings in .*chunk_sise: unknown"):
        gpu_limits(config)
