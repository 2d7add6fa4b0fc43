"""Two multiplexers wired back to back, as h11's ConnectionPair: the workhorse of mux tests."""

from __future__ import annotations

from tunnel import events as ev
from tunnel.mux import Multiplexer, Role, Settings


class MuxPair:
    """A client and a server multiplexer that exchange messages only when told to."""

    def __init__(
        self,
        client_settings: Settings | None = None,
        server_settings: Settings | None = None,
        *,
        handshake: bool = True,
        **mux_options: float,
    ) -> None:
        self.client = Multiplexer(Role.CLIENT, client_settings, **mux_options)  # type: ignore[arg-type]
        self.server = Multiplexer(
            Role.SERVER,
            server_settings or Settings(max_concurrent_streams=0),
            **mux_options,  # type: ignore[arg-type]
        )
        if handshake:
            self.client.send_hello({"client_name": "test"})
            assert isinstance(self.deliver(self.client, self.server)[0], ev.HelloReceived)
            self.server.send_hello({"session_id": "s"})
            assert isinstance(self.deliver(self.server, self.client)[0], ev.HelloReceived)

    def peer(self, mux: Multiplexer) -> Multiplexer:
        return self.server if mux is self.client else self.client

    @staticmethod
    def deliver(
        sender: Multiplexer, receiver: Multiplexer, max_bytes: int = 1 << 20
    ) -> list[ev.Event]:
        """Move everything ``sender`` has queued to ``receiver``; return its events."""
        events: list[ev.Event] = []
        while message := sender.data_to_send(max_bytes):
            events += receiver.receive_data(message)
        return events

    def exchange(self) -> tuple[list[ev.Event], list[ev.Event]]:
        """Deliver both ways until quiet; return (client events, server events)."""
        client_events: list[ev.Event] = []
        server_events: list[ev.Event] = []
        while self.client.has_data_to_send or self.server.has_data_to_send:
            server_events += self.deliver(self.client, self.server)
            client_events += self.deliver(self.server, self.client)
        return client_events, server_events
