"""Helpers shared by the tests: free ports, real peer processes, shared reference data."""
