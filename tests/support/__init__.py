"""Helpers shared by the tests: free ports, real peers, shared reference data."""
