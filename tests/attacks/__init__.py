"""Hostile peers for the attack tests and bench/attack.py: each module drives one attack against a
real daemon and reports what happened. Not shipped in the package."""
