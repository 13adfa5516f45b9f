"""The anyio edge: the session driver over a byte transport, the public
:class:`~capsock.Stream`, the asyncio fast path and the punching sockets."""
