"""Plain-ASGI helpers shared by the gateway and the model servers."""

from __future__ import annotations

from starlette.types import Receive


async def client_gone(receive: Receive) -> None:
    """Returns once the client has gone away. For use after the request's body is read: from
    then on `receive` has nothing else to say, and says `http.disconnect` when the client leaves
    (or once the response is complete). Sending cannot tell: the ASGI server drops what is sent
    to a gone client without a word."""
    while (await receive())["type"] != "http.disconnect":
        pass
