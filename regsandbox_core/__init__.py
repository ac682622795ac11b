"""Shared code of regsandbox: settings, secrets, cryptography, errors and logging.

Every other package may import this one; this one imports none of them.
"""
