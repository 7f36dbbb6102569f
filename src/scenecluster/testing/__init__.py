"""Helpers for tests, benchmarks and local demos: real services on loopback, started and stopped here."""
