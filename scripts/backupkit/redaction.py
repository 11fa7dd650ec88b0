"""Redaction: every secret this process knows (in the environment, or given on a command line
and registered here) is blanked out of whatever a script prints or writes."""

from __future__ import annotations

import os

from .config import SECRET_VARS
from .pgurl import url_secrets

# Secrets given on a command line (e.g. --database-url): redacted from output like those in the
# environment.
_flag_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    if value:
        _flag_secrets.add(value)


def flag_secrets() -> set[str]:
    return set(_flag_secrets)


def secrets_in_environment() -> list[str]:
    """Every secret this process knows, longest first (so a secret's part is never left over)."""
    found: list[str] = []
    for name in SECRET_VARS:
        value = os.environ.get(name)
        if not value:
            continue
        if name.endswith("DATABASE_URL") and "://" in value:
            # A URL's secret is its password: redacting the whole URL would also blank out
            # e.g. 'postgresql://' in "expected postgresql://USER:PASSWORD@…".
            found += url_secrets(value)
            continue
        if name.endswith("_PREVIOUS"):
            found += value.split(",")
        found += [value, value.strip()]
    found += flag_secrets()
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in secrets_in_environment():
        text = text.replace(secret, "***")
    return text
