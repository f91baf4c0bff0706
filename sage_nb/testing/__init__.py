"""Test doubles and test-model makers for sage_nb's tests, benchmarks and tutorials."""
