"""The string ``format`` s OpenAI's Structured Outputs lists, as patterns :mod:`qlora.infer.regex` enforces.

Each is anchored and follows its RFC's grammar, so it is exact except where noted; where it
is not, it is looser (it never refuses a valid string):

- ``date``, ``time``, ``date-time``: RFC 3339 ``full-date``, ``full-time`` and ``date-time``
  (``T``/``Z`` in either case, any fraction of a second, a ``±hh:mm`` offset); days within
  their month, 29 February in leap years only. Looser: a leap second (``:60``) at any time.
- ``duration``: RFC 3339 Appendix A's ISO 8601 durations (``P1Y2M``, ``PT5M``, ``P3W``).
  Looser: a unit may be skipped (``P1Y2D``, ``PT1H5S``), as ISO 8601 allows.
- ``uuid``: RFC 4122's hexadecimal ``8-4-4-4-12`` form, either case.
- ``ipv4``: a dotted quad of 0..255 without leading zeros; ``ipv6``: RFC 4291's text forms
  (``::`` compression, a trailing dotted quad), without a zone.
- ``hostname``: RFC 1123 labels (letters, digits and inner hyphens, 1 to 63 characters)
  joined by dots. Looser: the 253-character total is not checked.
- ``email``: RFC 5321's ``Mailbox``: a dot-string or quoted local part, ``@``, a domain or
  an address literal (``[192.0.2.1]``, ``[IPv6:...]``). Looser: length limits not checked.
"""

from __future__ import annotations

from functools import lru_cache

from .regex import Regex

_DAY_IN_MONTH = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
                 r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = rf"(?:[0-9]{{4}}-{_DAY_IN_MONTH}|{_LEAP_YEAR}-02-29)"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_DUR_TIME = r"T(?:[0-9]+H(?:[0-9]+M)?(?:[0-9]+S)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_DUR_DATE = r"(?:[0-9]+Y(?:[0-9]+M)?(?:[0-9]+D)?|[0-9]+M(?:[0-9]+D)?|[0-9]+D)"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986's ``IPv6address`` rule, one alternative per place of the ``::``."""
    forms = [rf"(?:{_H16}:){{6}}{_LS32}", rf"::(?:{_H16}:){{5}}{_LS32}"]
    for before, after in ((0, 4), (1, 3), (2, 2), (3, 1), (4, 0)):
        head = f"(?:(?:{_H16}:){{0,{before}}}{_H16})?"
        forms.append(rf"{head}::(?:{_H16}:){{{after}}}{_LS32}")
    forms.append(rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}")
    forms.append(rf"(?:(?:{_H16}:){{0,6}}{_H16})?::")
    return "(?:" + "|".join(forms) + ")"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_QUOTED = r'"(?:[ !#-\[\]-~]|\\[ -~])*"'
_SUBDOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LITERAL = rf"\[(?:{_IPV4}|IPv6:{_ipv6()}|[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+)\]"

FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}[Tt]{_TIME}",
    "duration": rf"P(?:{_DUR_DATE}(?:{_DUR_TIME})?|{_DUR_TIME}|[0-9]+W)",
    "uuid": r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}",
    "ipv4": _IPV4,
    "ipv6": _ipv6(),
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "email": rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})@(?:{_SUBDOMAIN}(?:\.{_SUBDOMAIN})*|{_LITERAL})",
}


@lru_cache(maxsize=None)
def format_regex(name: str) -> Regex | None:
    """The compiled pattern of a format (None: one not enforced)."""
    return Regex(FORMATS[name], anchored=True) if name in FORMATS else None
