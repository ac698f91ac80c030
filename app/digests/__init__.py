"""Digests: many storage changes of one route told in one email (issue 11)."""
