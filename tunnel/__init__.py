"""What the exit server and the client share: the wire protocol and its asyncio shell.

Pure modules (no asyncio, no sockets, no clock): ``errors``, ``frames``,
``events``, ``window``, ``mux``, ``backoff``. The shell: ``session``,
``auth``, ``log``, ``version``.
"""
