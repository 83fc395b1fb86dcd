"""Secrets: the one redaction step and the one comparison.

Every configured secret (tokens, keys, sink URLs and the keys inside them, header values
and the credential part of a header value such as ``X`` of ``Bearer X``) is registered
here when a configuration is loaded. ``mask`` replaces each of them wherever it appears;
it is applied to every log line (structlog and the standard library's loggers alike), to
every HTTP response body the API builds, and to every local alert. No call site has to
remember it.

Values shorter than ``MIN_LEN`` characters are not masked: masking a three-letter value
would blank out ordinary words in every log line, and such a value protects nothing.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
MIN_LEN = 4

_lock = threading.Lock()
_values: tuple[str, ...] = ()


def _parts(value: str) -> set[str]:
    """The value and the pieces of it that could be echoed on their own."""
    found = {value, quote(value, safe="")}
    words = value.split()
    if len(words) > 1:  # "Bearer X", "GenieKey X": the credential is the last word
        found.update(words[1:])
    try:
        url = urlsplit(value)
    except ValueError:
        return found
    if url.scheme and url.netloc:
        if url.password:
            found.add(url.password)
        if url.username and url.password:
            found.add(url.username)
        for _, query_value in parse_qsl(url.query, keep_blank_values=False):
            found.add(query_value)
        if url.query:
            found.add(url.query)
        for segment in url.path.split("/"):
            # Keys in a path (AlertOps) are long and carry digits; "enqueue" does not.
            if len(segment) >= 8 and any(c.isdigit() for c in segment):
                found.add(segment)
    return found


def register(values: Iterable[str]) -> None:
    """Add secret values to mask from now on (idempotent)."""
    global _values
    with _lock:
        known = set(_values)
        for value in values:
            known.update(p for p in _parts(value) if len(p) >= MIN_LEN)
        _values = tuple(sorted(known, key=len, reverse=True))


def reset() -> None:
    """Forget every registered value (tests)."""
    global _values
    with _lock:
        _values = ()


def secrets_of(obj: Any) -> list[str]:
    """Every ``SecretStr`` value inside a (nested) pydantic model."""
    found: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, SecretStr):
            found.append(item.get_secret_value())
        elif isinstance(item, BaseModel):
            for name in type(item).model_fields:
                walk(getattr(item, name))
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, list | tuple):
            for value in item:
                walk(value)

    walk(obj)
    return [value for value in found if value]


def mask(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for value in _values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_any(obj: Any) -> Any:
    """``mask`` applied to every string inside dicts, lists and tuples."""
    if not _values:
        return obj
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {k: mask_any(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(mask_any(v) for v in obj)
    if isinstance(obj, BaseException):
        return mask(repr(obj))
    return obj


def structlog_processor(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """The structlog step: runs after exceptions are formatted, before rendering."""
    masked: dict[str, Any] = mask_any(dict(event))
    return masked


def same_secret(given: str | None, expected: SecretStr | str | None) -> bool:
    """Constant-time comparison; an absent or empty value on either side never matches."""
    if given is None or expected is None:
        return False
    want = expected.get_secret_value() if isinstance(expected, SecretStr) else expected
    if not given or not want:
        return False
    return hmac.compare_digest(given.encode(), want.encode())
