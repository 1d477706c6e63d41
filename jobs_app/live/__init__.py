"""Live job updates: the LISTEN connection and the Server-Sent Events streams."""
