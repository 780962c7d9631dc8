"""PostgreSQL wire-protocol machinery shared by the emulator and the proxy.

Framing and parsing of messages, the startup, SSL, GSSENC and cancel packets, the TLS
upgrade and direct TLS, the stream relay, and the client side of backend login (cleartext,
MD5, SCRAM-SHA-256). Not imported by ``import iampg``: only by the emulator and the proxy.
"""
