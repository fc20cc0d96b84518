"""The producer side: CLI, planning, submission and status. Never imports torch."""
