"""The migration stream as a sans-io protocol: bytes in, events out; events in, bytes out. No sockets.

``connection`` is the API (``SourceConnection``, ``DestinationConnection``); ``events`` the messages;
``rules`` every kind of message, when it may appear and what makes it valid; ``codec`` their bytes;
``framing`` the cutting of a byte stream into frames; ``auth`` keys and MACs; ``acceptance`` what a
destination takes; ``loopback`` two connections back to back, for tests.
"""
