"""The client: dials the exit server and pipes streams to LAN upstreams."""
