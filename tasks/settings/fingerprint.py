"""Which settings own an output directory: a change to any of them changes the answers."""

from __future__ import annotations

from typing import Any

# The settings that own an output directory: a change to any of them changes the answers (or
# which rows a chunk holds), so its rows must not mix with the directory's. The rest (in_flight,
# timeouts, host, checkpointing) is plumbing and may change between runs of one job.
ANSWER_FIELDS = (
    "trim_field",
    "id_column",
    "prompt_template",
    "system_prompt",
    "backend",
    "model",
    "model_path",
    "options",
    "chunk_size",
    "structured_output",  # a grammar or a schema in the prompt: other answers
)
# backend_sampling is plumbing: the same sampler chain runs on the backend instead of the host, and greedy
# answers came back identical with and without it from a real llama-server at 1 in flight
# (tests/test_openai_backend.py); at 4 in flight two runs without it already differ now and then.


def answer_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The answer-changing settings two dumped configurations differ in, as `key: old -> new`."""

    def flat(data: dict[str, Any]) -> dict[str, Any]:
        found = {}
        for key in ANSWER_FIELDS:
            value = data.get(key)
            if isinstance(value, dict):
                found.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                found[key] = value
        return found

    old, new = flat(before), flat(after)
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    ]
