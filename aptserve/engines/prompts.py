"""Prompt completion: a short prompt rewritten into the caption form its model was trained on.

A model trained on full captions ("a large red circle moving left slowly on a black background") meets a user's
"a red circle moving left" outside its training distribution, and draws it worse than the same request written
out. Large text-to-image and text-to-video systems rewrite ("upsample") user prompts with a language model for
the same reason. A model trained on a caption grammar can do it exactly, with the grammar its checkpoint carries
(`ModelConfig.prompt_grammar`): parse the prompt by the grammar's vocabulary, keep every value it names, and draw
each value it leaves open uniformly from the grammar with the request's seed, so a (prompt, seed) pair still
names one clip, and different seeds still vary what the prompt leaves open. A prompt the grammar does not cover
(a word outside its vocabulary, two values for one slot, a required slot missing) is left as written: nothing a
user typed is ever dropped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    """One attribute of a caption: its values, each with the phrase that says it ("left" -> "moving left")."""

    name: str
    phrases: dict[str, str]
    required: bool = False


@dataclass(frozen=True)
class CaptionGrammar:
    """Captions made of `slots` in order, after `prefix`, each slot's phrase or nothing (optional slots)."""

    slots: tuple[Slot, ...]
    prefix: str = "a"

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}
        for slot in self.slots:
            if not slot.phrases:
                raise ValueError(f"prompt grammar slot {slot.name!r} has no values")
            for value, phrase in slot.phrases.items():
                if not re.fullmatch(r"[a-z]+", value) or value not in _words(phrase):
                    raise ValueError(f"slot {slot.name!r}: value {value!r} must be one word of its phrase {phrase!r}")
                if owner.setdefault(value, slot.name) != slot.name:
                    raise ValueError(f"value {value!r} belongs to slots {owner[value]!r} and {slot.name!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionGrammar:
        slots = tuple(Slot(s["name"], dict(s["phrases"]), bool(s.get("required", False))) for s in data["slots"])
        return cls(slots, data.get("prefix", "a"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "slots": [{"name": s.name, "phrases": dict(s.phrases), "required": s.required} for s in self.slots],
        }

    def render(self, values: dict[str, str]) -> str:
        """The caption that says `values` (slot name -> value); slots without a value are left out."""
        phrases = [slot.phrases[values[slot.name]] for slot in self.slots if slot.name in values]
        return " ".join([self.prefix, *phrases] if self.prefix else phrases)

    def parse(self, prompt: str) -> dict[str, str] | None:
        """The values a prompt names, or None where the grammar does not cover it."""
        words = _words(prompt)
        glue = set(_words(self.prefix)) | {w for s in self.slots for p in s.phrases.values() for w in _words(p)}
        if not words or any(w not in glue for w in words):
            return None
        values: dict[str, str] = {}
        for slot in self.slots:
            named = [w for w in dict.fromkeys(words) if w in slot.phrases]
            if len(named) > 1 or (slot.required and not named):
                return None
            if named:
                values[slot.name] = named[0]
        return values

    def complete(self, prompt: str, seed: int) -> str:
        """`prompt` with the values it leaves open drawn by `seed`; the prompt itself where it does not parse."""
        values = self.parse(prompt)
        if values is None:
            return prompt
        rng = random.Random(seed)
        for slot in self.slots:
            choice = rng.choice(sorted(slot.phrases))  # drawn for every slot, so one slot's draw never shifts another's
            values.setdefault(slot.name, choice)
        return self.render(values)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())
