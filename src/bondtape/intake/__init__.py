"""Channels' framing around the one intake path (bulk files here; web, REST and FIX elsewhere)."""
