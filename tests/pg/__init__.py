"""Tests of the PostgreSQL backends against a throwaway PostgreSQL."""
