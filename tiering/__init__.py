"""Tiering (policies, movers, nearline and tape tiers): the subject of a later issue; nothing here yet."""
