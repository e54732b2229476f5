"""Tiering: the tiers below the online volumes (nearline archives, tape), the policies that move studies down,
the movers that do it without losing data, and recalls that bring studies back (docs/tiering.md)."""
