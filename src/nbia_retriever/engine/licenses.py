"""Licences: the ``--license``/``--exclude-license`` filter, and the question asked once
before the first download of a collection whose licence is not a plain CC BY.

TCIA publishes most collections under CC BY (attribution only: nothing to agree to
beyond citing), but some under CC BY-NC (no commercial use), CC BY-SA, or TCIA's
restricted licence. Downloading those binds the user, so the Java CLI shows its data
usage agreement and asks (``--agree-to-license`` skips it). Here the question is per
collection and remembered (``[licenses] accepted`` in the config file); a headless run
without ``--agree-to-license`` leaves those series out with one line that says which
collections, under which licence, and how to accept. The filter drops series from the
run before any image is fetched (metadata is what names the licence).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..config import accept_licenses, load_user_config
from ..errors import UsageError
from ..models import SeriesInfo
from ..report import LICENCE_REFUSED

#: Controlled-access (DRS) data is gated like a licence that must be accepted
#: (:mod:`.licenses`): asked once per collection on a terminal, remembered, or accepted
#: for a run by ``--accept-data-policy`` (= ``--agree-to-license``); a headless run
#: without it leaves the rows out as Not Authorized, saying so.
DATA_POLICY_NAME = "NCI CRDC controlled-access data use policy"
DATA_POLICY_URL = "https://dcf.gen3.org/data-access-with-dcf"

#: ``https://creativecommons.org/licenses/by/4.0/`` and the like: attribution only.
_PLAIN_URL = re.compile(r"^https?://(www\.)?creativecommons\.org/licenses/by/\d+(\.\d+)?/?$")
#: "Creative Commons Attribution 4.0 International License", "CC BY 4.0", "CC-BY 3.0".
_PLAIN_NAME = re.compile(r"^(creative commons attribution|cc[ -]by)( \d+(\.\d+)?)?"
                         r"( international| unported)?( license| licence)?$")


@functools.lru_cache(maxsize=4096)
def needs_agreement(name: str, url: str) -> bool:
    """True for a licence that is not a plain CC BY (NC, SA, ND, TCIA's restricted...).

    No licence at all asks nothing (the Java tools write no LICENSE then); each of the
    name and the URL that is given must read as plain CC BY. Remembered per pair: it is
    asked for every series planned, and a run holds a handful of licences (the two
    regular expressions per series were 0.8 s of planning 200,000 series).
    """
    name = " ".join(name.split()).casefold()
    url = url.strip().casefold()
    if not name and not url:
        return False
    return bool((name and not _PLAIN_NAME.match(name)) or (url and not _PLAIN_URL.match(url)))


def license_matches(info: SeriesInfo, text: str) -> bool:
    """The series' licence name or URL contains ``text`` (any case)."""
    needle = text.strip().casefold()
    return needle in info.license_name.casefold() or needle in info.license_url.casefold()


_CC_URL = re.compile(r"creativecommons\.org/licenses/([a-z-]+)/(\d+(\.\d+)?)")


def license_label(info: SeriesInfo) -> str:
    """The licence as a short cell: a Creative Commons URL as its usual short name
    ("CC BY 4.0", "CC BY-NC 3.0"), else its name, else its URL; "" when none."""
    found = _CC_URL.search(info.license_url.casefold())
    if found:
        return f"CC {found.group(1).upper()} {found.group(2)}"
    return info.license_name.strip() or info.license_url.strip()


@dataclass
class LicenseGate:
    """Sorts each planning batch: kept, filtered out, or waiting for a licence agreement.

    ``confirm(collection, name, url)`` is asked at most once per collection (from the
    planning thread, before any of its series is queued); a yes is remembered with
    ``remember``. ``accepted`` are collections the user accepted before (config file).
    """

    agree: bool = False
    keep: str | None = None
    exclude: str | None = None
    confirm: Callable[[str, str, str], bool] | None = None
    accepted: frozenset[str] = frozenset()
    remember: Callable[[str], None] | None = None
    #: Collections refused this run: (licence name, URL), for the one summary line.
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _decided: dict[str, bool] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wanted(self, info: SeriesInfo) -> bool:
        """The filter: False drops the series from the run."""
        if self.keep is not None and not license_matches(info, self.keep):
            return False
        return not (self.exclude is not None and license_matches(info, self.exclude))

    def allowed(self, info: SeriesInfo) -> bool:
        """May this series be downloaded (its licence accepted, or nothing to accept)?"""
        if not needs_agreement(info.license_name, info.license_url):
            return True
        collection = info.collection
        with self._lock:
            known = self._decided.get(collection)
            if known is not None:
                return known
            if self.agree or collection in self.accepted:
                answer = True
            elif self.confirm is not None:
                answer = bool(self.confirm(collection, info.license_name.strip(),
                                           info.license_url.strip()))
                if answer and self.remember is not None:
                    try:
                        self.remember(collection)
                    except UsageError as exc:
                        self.notes.append(f"warning: {exc}")
            else:
                answer = False
            self._decided[collection] = answer
            if not answer:
                self.refused[collection] = (info.license_name.strip(), info.license_url.strip())
            return answer

    def refusal(self, info: SeriesInfo) -> str:
        """Why a series is left out, in one line."""
        name, url = info.license_name.strip(), info.license_url.strip()
        what = f"{name} ({url})" if name and url else name or url
        flag = "--accept-data-policy" if _is_data_policy(name) else "--agree-to-license"
        return (f"{LICENCE_REFUSED}{info.collection} is under {what}; re-run with "
                f"{flag} to accept it")

    def summary(self) -> str | None:
        """The one line a headless run prints for the collections it left out."""
        if not self.refused:
            return None
        parts = [f"{c} ({n or u}{', ' + u if n and u else ''})"
                 for c, (n, u) in sorted(self.refused.items())]
        policy = any(_is_data_policy(n) for n, _ in self.refused.values())
        flag = "--agree-to-license (--accept-data-policy)" if policy else "--agree-to-license"
        return ("not downloaded, licence not accepted: " + "; ".join(parts)
                + f". Re-run with {flag} to accept, or --exclude-license TEXT "
                  "to leave them out")


def _is_data_policy(name: str) -> bool:
    """The licence controlled-access (DRS) rows carry (``engine.route``): its flag is
    ``--accept-data-policy``, as in TCIA's Go retriever (the same switch)."""
    return name == DATA_POLICY_NAME


def gate_for(agree: bool, keep: str | None, exclude: str | None,
             confirm: Callable[[str, str, str], bool] | None) -> LicenseGate:
    """The run's gate: the user's earlier answers read from the config file (an
    unreadable file is a :class:`UsageError` naming it, as for trusted hosts)."""
    accepted = frozenset(load_user_config().accepted_licenses)

    def remember(collection: str) -> None:
        accept_licenses([collection])

    return LicenseGate(agree=agree, keep=keep, exclude=exclude, confirm=confirm,
                       accepted=accepted, remember=remember)


def split(infos: Iterable[SeriesInfo], gate: LicenseGate
          ) -> tuple[list[SeriesInfo], list[SeriesInfo], list[SeriesInfo]]:
    """(kept, filtered out, refused) in the order given."""
    kept: list[SeriesInfo] = []
    dropped: list[SeriesInfo] = []
    refused: list[SeriesInfo] = []
    for info in infos:
        if not gate.wanted(info):
            dropped.append(info)
        elif gate.allowed(info):
            kept.append(info)
        else:
            refused.append(info)
    return kept, dropped, refused


__all__ = ["DATA_POLICY_NAME", "DATA_POLICY_URL", "LicenseGate", "gate_for", "license_label",
           "license_matches", "needs_agreement", "split"]
