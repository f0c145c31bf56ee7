"""Helpers shared by the test modules (no tests here): inputs, reference checks and runners.

Test modules import from here, never from one another.
"""
