"""Helpers for the tests, not tests themselves (see tests/README.md); no test module imports another."""
