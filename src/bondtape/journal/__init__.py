"""The append-only journal: every accepted input, with a gapless sequence number."""
