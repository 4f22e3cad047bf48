"""What a lab admin does to the state directory by hand: find a batch by what `ingestd status` shows, retry it,
release it, take a release back, re-send a delivered study, purge what retention would remove, check a
configuration. The CLI parses arguments and calls these; the daemon's own workers never do."""
