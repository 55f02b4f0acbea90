"""Keep secrets out of everything the run writes or prints, and image URLs on the right side.

The key is known, so it is removed by value wherever a server echoes it (error bodies,
`x-request-id`, `revised_prompt`), whatever its format: Azure keys do not start with
`sk-`. Credentials in a base URL are masked before it is recorded. A `url` image result
may point only where the base URL itself may: a public server never sends the run to
loopback, private or link-local addresses (or to `file://`).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import overload
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "[redacted]"
_SECRET_QUERY = ("key", "token", "secret", "sig", "signature", "password", "auth")


def secrets_of(api_key: str | None, base_url: str) -> tuple[str, ...]:
    """The values never to write: the key, and a password or token in the base URL."""
    found = [api_key or ""]
    parts = urlsplit(base_url)
    found += [parts.password or "", parts.username or ""]
    found += [v for k, v in parse_qsl(parts.query) if any(s in k.lower() for s in _SECRET_QUERY)]
    # Short values would mask ordinary words; real keys and passwords are long.
    return tuple(sorted({s for s in found if len(s) >= 6}, key=len, reverse=True))


@overload
def scrub(text: str, secrets: tuple[str, ...]) -> str: ...
@overload
def scrub(text: str | None, secrets: tuple[str, ...]) -> str | None: ...
def scrub(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """`text` with every secret replaced by a mask, and writable: a lone surrogate (legal as a
    JSON escape, "\\ud800", but not encodable as UTF-8) is kept as that escape, as text.
    Every string a server sends passes here before it is recorded."""
    if not text:
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if not secrets:
        return text
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_url(url: str) -> str:
    """`url` with user info and secret-looking query values masked, for run.json and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        host = netloc.rsplit("@", 1)[-1]
        netloc = f"{MASK}@{host}"
    query = urlencode(
        [
            (k, MASK if any(s in k.lower() for s in _SECRET_QUERY) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def shown_url(url: str) -> str:
    """An image URL for a message: no query string (signed URLs carry tokens there)."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()[:300]


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def host_is_internal(host: str, *, resolve: bool = True) -> bool:
    """True when `host` is, or resolves to, a loopback, private or link-local address."""
    host = host.strip("[]")
    try:
        return _internal(host)
    except ValueError:
        pass
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    if not resolve:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # the download itself will fail and say so
    return any(_internal(str(info[4][0])) for info in infos)
