"""Everything that crosses ranks. The loss path calls collectives only from this package."""
