"""Helpers shared by the tests: process runners, a test upstream, the MuxPair."""
