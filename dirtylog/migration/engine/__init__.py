"""The migration engine: the source and destination drivers that move a running machine's memory over
streams of the protocol, on whatever channel the transports give them (threads and I/O live here)."""
