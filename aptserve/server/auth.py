"""Bearer-key authentication. No keys configured means an open server (the app warns at startup)."""

from __future__ import annotations

import hmac

from fastapi import Request, WebSocket

from aptserve.server.errors import APIError


def key_is_valid(keys: list[str], presented: str | None) -> bool:
    if not keys:
        return True
    return presented is not None and any(hmac.compare_digest(presented, key) for key in keys)


def bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for every /v1 HTTP route."""
    keys = request.app.state.services.settings.api_keys
    if not key_is_valid(keys, bearer(request.headers.get("authorization"))):
        request.app.state.services.metrics.error("auth")
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.", "invalid_api_key")


def websocket_key_is_valid(websocket: WebSocket) -> bool:
    """Browsers cannot set headers on a WebSocket, so the key may also come as the `api_key` query parameter."""
    keys = websocket.app.state.services.settings.api_keys
    presented = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
    return key_is_valid(keys, presented)
