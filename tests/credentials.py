"""Feed tokens for tests: a known secret, the secure server config, and a minting helper.

Shared by every test that needs credentials (test modules never import each other).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from tracker.auth import Keyring

SECRET = "s" * 32
OLD_SECRET = "o" * 32
SECURE: dict[str, Any] = {"open_feeds": False, "token_secrets": SECRET}
"""The secure default (feeds need tokens), with a secret the test can sign with."""


def mint_token(secret: str = SECRET, ttl_s: float = 60, **area: list[str]) -> str:
    """A feed token signed with ``secret``, for ``area`` (a feed query) or everywhere."""
    return Keyring([secret], resolution=7, max_cells=4000).mint(
        ttl_s=ttl_s, area=area if area else None
    )


def admin_token(secret: str = SECRET, ttl_s: float = 60) -> str:
    """An admin token (every area; may change zones, webhooks, links) signed with ``secret``."""
    return Keyring([secret], resolution=7, max_cells=4000).mint(ttl_s=ttl_s, admin=True)


HEADER = b'{"alg":"HS256","typ":"JWT"}'


def sign_claims(payload: str, secret: str = SECRET) -> str:
    """A correctly signed HS256 token whose payload is ``payload`` verbatim (JSON text).

    For claims no JWT library would write: ``{"exp": 1e400}``, ``NaN``, 400-digit integers.
    """
    signing_input = f"{_b64(HEADER)}.{_b64(payload.encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
