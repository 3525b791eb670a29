"""Writes of the profiles app: the audit, the profile sync unit, soft delete and restore."""
