"""Defenses against data-reconstruction attacks (not implemented yet; see the README status)."""
