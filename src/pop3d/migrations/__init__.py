"""The PostgreSQL schema as numbered SQL migrations (applied by :mod:`pop3d.dbadmin`)."""
