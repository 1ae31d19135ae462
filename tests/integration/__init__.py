"""Integration tests: a real pop3d on 127.0.0.1, driven over sockets by real clients."""
