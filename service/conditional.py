"""Standard HTTP long polling: the request headers a conditional GET of a task may carry.

- ``If-None-Match`` (RFC 9110, 13.1.2): the entity tags the client holds. Ours are the version in
  quotes, ``"7"``; the comparison is weak, so ``W/"7"`` matches too.
- ``Prefer: wait=<seconds>`` (RFC 7240, 4.3): how long the client is willing to wait for the answer.

Pure parsing, no HTTP objects. Anything malformed is read leniently, never as an error: an
``If-None-Match`` that does not parse matches nothing (the request is a plain GET), an unknown
preference or a ``wait`` that is not a number of seconds is ignored, as RFC 7240 asks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .model import MAX_COUNTER

# An element of an If-None-Match list: "*" or an entity tag, each possibly empty (RFC 9110, 5.6.1)
_TAG_ELEMENT = re.compile(r'[ \t]*(?:(\*)|(?:W/)?"([^"\x00-\x20\x7f]*)")?[ \t]*(,|\Z)')
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_WORD = rf'(?:{_TOKEN}|"(?:[^"\\]|\\.)*")'
_PARAMETER = rf"{_TOKEN}(?:[ \t]*=[ \t]*{_WORD})?"
# One preference: token [= word] *(; parameter), then the end of the element (RFC 7240, 2).
_PREFERENCE = re.compile(
    rf"[ \t]*(?:({_TOKEN})(?:[ \t]*=[ \t]*({_WORD}))?(?:[ \t]*;[ \t]*(?:{_PARAMETER})?)*)?"
    r"[ \t]*(,|\Z)"
)


@dataclass(frozen=True, slots=True)
class EntityTags:
    """What ``If-None-Match`` names: any current state (``*``), or the versions the client has."""

    versions: frozenset[int]
    any: bool = False

    def matches(self, version: int) -> bool:
        return self.any or version in self.versions

    @property
    def single(self) -> int | None:
        """The one version named, in the usual case of a client that holds one state."""
        if self.any or len(self.versions) != 1:
            return None
        return next(iter(self.versions))


def _elements(pattern: re.Pattern[str], value: str) -> Iterable[re.Match[str]]:
    """The comma-separated elements of one header value; ValueError where one does not parse."""
    position = 0
    while position < len(value):
        match = pattern.match(value, position)
        if match is None:
            raise ValueError(f"malformed at {position}")
        yield match
        position = match.end()


def _version(tag: str) -> int | None:
    """The version an entity tag of ours names, or None for any other tag."""
    if not tag.isascii() or not tag.isdigit() or len(tag) > 16 or int(tag) > MAX_COUNTER:
        return None
    return int(tag)


def parse_if_none_match(values: Iterable[str]) -> EntityTags | None:
    """The tags of every ``If-None-Match`` header; None when there is none, or it is malformed
    or names nothing this service could have sent: then nothing matches and a GET answers 200."""
    versions: set[int] = set()
    star = elements = 0
    try:
        for value in values:
            for match in _elements(_TAG_ELEMENT, value):
                if match.group(1):
                    star += 1
                elif match.group(2) is not None:
                    version = _version(match.group(2))
                    if version is not None:
                        versions.add(version)
                else:
                    continue  # an empty list element
                elements += 1
    except ValueError:
        return None
    if star:
        # "*" stands alone (RFC 9110): any current state matches, and every task has one.
        return EntityTags(frozenset(), any=True) if elements == 1 else None
    return EntityTags(frozenset(versions)) if versions else None


def parse_prefer_wait(values: Iterable[str]) -> int | None:
    """Seconds of ``Prefer: wait=<seconds>``, or None when not asked for (or not a number).

    Only the first ``wait`` counts (RFC 7240, 2); other preferences, and anything after a
    malformed element of a header, are ignored. A wait too long to write down reads as
    ``MAX_COUNTER``: the caller caps it anyway.
    """
    for value in values:
        try:
            for match in _elements(_PREFERENCE, value):
                name, word = match.group(1), match.group(2)
                if name is None or name.lower() != "wait":
                    continue
                seconds = word[1:-1] if word and word.startswith('"') else word
                if not seconds or not seconds.isascii() or not seconds.isdigit():
                    return None
                return MAX_COUNTER if len(seconds) > 16 else min(int(seconds), MAX_COUNTER)
        except ValueError:
            continue
    return None
