"""Every route of an engine behind the job's key: an ASGI middleware that vLLM loads from this package
(``--middleware flowrl_megatron.rollout.auth.RequireKey``).

vLLM's own ``--api-key`` guards only its inference prefixes (``/v1``, ...). An RL engine also serves the routes that
pause it, push weights into it and call methods on its workers (``/pause``, ``/update_weights``,
``/collective_rpc``, ...), and ``/invocations`` generates without the key; on a shared cluster anyone who can reach
the node's port could use them. Only the liveness and readiness probes stay open: they reveal nothing and
schedulers and load balancers call them without credentials.

The key reaches the server through the environment (``KEY_ENV``), never its command line, which every local user can
read in /proc.
"""

from __future__ import annotations

import hashlib
import hmac
import os

KEY_ENV = "VLLM_API_KEY"  # vLLM's own variable: its /v1 check and this middleware read the same key
TRAINER_KEY_ENV = "FLOWRL_API_KEY"  # where a trainer (and `flowrl serve`) finds the key of engines started elsewhere
PROBES = frozenset({"/health", "/ping", "/ready", "/readyz"})
UNAUTHORIZED = b'{"error": "Unauthorized: send the job\'s key as \\"Authorization: Bearer KEY\\""}'


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()  # fixed length, so the comparison below takes constant time


class RequireKey:
    """401 for any HTTP request, and a refused handshake for any WebSocket, that lacks ``Authorization: Bearer KEY``,
    except the probes in ``PROBES``."""

    def __init__(self, app) -> None:
        key = os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: an engine must not start without its key.")
        self.app = app
        self.key_digest = _digest(key)

    def authorized(self, scope: dict) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in PROBES:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token), self.key_digest)
        return False

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "http" and not self.authorized(scope):
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": UNAUTHORIZED})
            return
        if scope["type"] == "websocket" and not self.authorized(scope):
            await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake is refused (403)
            return
        await self.app(scope, receive, send)
