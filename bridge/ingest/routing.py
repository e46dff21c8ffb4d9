"""Routes: which received instances go to which peers, and when a study is done.

A route matches an instance on the calling AE title, the called AE title and
attribute values of its header (``Modality``, for one), and names the peers the
study goes to. Routes are tried in configured order; the first that matches
wins, so a specific route belongs above a catch-all one. An instance that no
route matches is refused, or kept in a held study (:class:`Unrouted`).

Patterns are shell-style globs (``*``, ``?``, ``[..]``), compared case-sensitively
with the value as it stands in the header, trailing spaces removed; a list of
patterns matches when any one does, and a multi-valued attribute matches when any
of its values does. An absent or empty attribute has the value ``""``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# The route name under which instances that match no route are held.
UNROUTED = "(unrouted)"

Patterns = tuple[str, ...]


class Unrouted(StrEnum):
    """What happens to an instance that matches no route."""

    REJECT = "reject"  # refuse the association, or the instance, up front
    HOLD = "hold"  # keep it in a held study for an operator


@dataclass(frozen=True)
class RouteRule:
    """One route; see the module docstring for how patterns match.

    ``calling_ae`` and ``called_ae`` are lists of patterns, empty for any.
    ``match`` maps pydicom keywords to a pattern or a list of patterns.
    ``required_series`` lists the series that make a study complete: each item
    maps keywords to patterns that one series must match, and a plain string is
    short for ``{"SeriesDescription": string}``. Times are seconds.
    Raises ValueError naming the bad field.
    """

    name: str
    peers: tuple[str, ...]
    calling_ae: Patterns = ()
    called_ae: Patterns = ()
    match: Mapping[str, str | Patterns] = field(default_factory=dict)
    quiet_seconds: float = 120.0
    max_age_seconds: float = 3600.0
    required_series: tuple[Mapping[str, str | Patterns] | str, ...] = ()

    def __post_init__(self) -> None:
        where = f"route {self.name!r}"
        if not self.name or self.name == UNROUTED:
            raise ValueError(
                f"route name: expected a non-empty name, got {self.name!r}"
            )
        peers = tuple(self.peers)
        if not peers:
            raise ValueError(f"{where}.peers: expected at least one peer")
        if not 0 < self.quiet_seconds <= self.max_age_seconds:
            raise ValueError(
                f"{where}: expected 0 < quiet_seconds <= max_age_seconds, got "
                f"{self.quiet_seconds} and {self.max_age_seconds}"
            )
        required = tuple(
            _patterns_by_keyword(
                {"SeriesDescription": item} if isinstance(item, str) else item,
                f"{where}.required_series[{i}]",
            )
            for i, item in enumerate(self.required_series)
        )
        set_ = object.__setattr__  # the dataclass is frozen; normalise once here
        set_(self, "peers", peers)
        set_(self, "calling_ae", _as_patterns(self.calling_ae))
        set_(self, "called_ae", _as_patterns(self.called_ae))
        set_(self, "match", _patterns_by_keyword(self.match, f"{where}.match"))
        set_(self, "required_series", required)

    @property
    def keywords(self) -> frozenset[str]:
        """Every header keyword this route reads to match or to seal."""
        names = set(self.match)
        for item in self.required_series:
            names.update(item)
        return frozenset(names)

    def admits(self, calling_ae: str, called_ae: str) -> bool:
        """Return True when an association with these AE titles may match."""
        return _any_match(calling_ae.strip(), self.calling_ae) and _any_match(
            called_ae.strip(), self.called_ae
        )

    def matches(self, calling_ae: str, called_ae: str, ds: Dataset) -> bool:
        """Return True when this route takes the instance with header ``ds``."""
        return self.admits(calling_ae, called_ae) and header_matches(ds, self.match)

    def satisfied_series(self, ds: Dataset) -> frozenset[int]:
        """Return the indices of ``required_series`` that the header ``ds`` meets."""
        return frozenset(
            i for i, item in enumerate(self.required_series) if header_matches(ds, item)
        )


class Router:
    """Picks the route of each instance; routes are tried in order."""

    def __init__(self, routes: Sequence[RouteRule], unrouted: Unrouted):
        names = [r.name for r in routes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"routes: names must be unique, repeated: {twice}")
        self.routes = tuple(routes)
        self.unrouted = Unrouted(unrouted)
        self._by_name = {r.name: r for r in self.routes}

    @property
    def keywords(self) -> frozenset[str]:
        """Every header keyword some route reads."""
        return frozenset().union(*(r.keywords for r in self.routes))

    def get(self, name: str) -> RouteRule | None:
        """Return the route called ``name``, or None."""
        return self._by_name.get(name)

    def admits(self, calling_ae: str, called_ae: str) -> bool:
        """Return False when no instance of this association could be taken."""
        if self.unrouted == Unrouted.HOLD:
            return True
        return any(r.admits(calling_ae, called_ae) for r in self.routes)

    def route_for(
        self, calling_ae: str, called_ae: str, ds: Dataset
    ) -> RouteRule | None:
        """Return the first route that takes the instance, or None."""
        for rule in self.routes:
            if rule.matches(calling_ae, called_ae, ds):
                return rule
        return None


def header_matches(ds: Dataset, patterns: Mapping[str, Patterns]) -> bool:
    """Return True when every keyword's value in ``ds`` matches its patterns."""
    return all(
        any(_any_match(value, pats) for value in _values(ds, keyword))
        for keyword, pats in patterns.items()
    )


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return [""]
    if isinstance(value, MultiValue):
        return [str(v).strip() for v in value] or [""]
    return [str(value).strip()]


def _any_match(value: str, patterns: Patterns) -> bool:
    return not patterns or any(fnmatchcase(value, p) for p in patterns)


def _as_patterns(value: str | Iterable[str]) -> Patterns:
    return (value,) if isinstance(value, str) else tuple(value)


def _patterns_by_keyword(
    mapping: Mapping[str, str | Iterable[str]], where: str
) -> dict[str, Patterns]:
    checked = {}
    for keyword, pats in mapping.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(
                f"{where}: {keyword!r} is not a DICOM keyword (e.g. 'Modality')"
            )
        checked[keyword] = _as_patterns(pats)
        if not checked[keyword]:
            raise ValueError(f"{where}.{keyword}: expected at least one pattern")
    return checked
