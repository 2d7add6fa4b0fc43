"""The exit server: public HTTP listener, control endpoint, routing by Host."""
