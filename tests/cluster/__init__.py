"""The multi-node suite: PostgreSQL, HAProxy and three pop3d nodes as real processes."""
