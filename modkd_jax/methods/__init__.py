"""One file per method, each on the contract of ``modkd_jax.learner``; configs are frozen dataclasses."""

from __future__ import annotations

import dataclasses


def from_preset(cls, preset: dict, **overrides):
    """The config dataclass ``cls``: its defaults, then ``preset``'s entries that are its fields, then ``overrides``.

    A preset may also hold run settings (task count, validation share) that are not fields; they are skipped.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in preset.items() if k in fields}, **overrides})
