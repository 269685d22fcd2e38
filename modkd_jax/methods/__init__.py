"""One file per method, each on the contract of ``modkd_jax.learner``; configs are frozen dataclasses."""

from __future__ import annotations

import dataclasses


RUN_SETTINGS = ("task_count", "val_fraction")  # preset entries that set the scenario, not the method


def from_preset(cls, preset: dict, **overrides):
    """The config dataclass ``cls``: its defaults, then ``preset``'s entries that are its fields, then ``overrides``.

    A preset may also hold the run settings ``RUN_SETTINGS`` (the scenario's task count and validation
    share); any other key that is not a field of ``cls`` is a ValueError (a typo in a preset is not ignored).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(preset) - fields - set(RUN_SETTINGS)) + sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    return cls(**{**{k: v for k, v in preset.items() if k in fields}, **overrides})
