"""What the public sees: pure dissemination rules and the feed."""
