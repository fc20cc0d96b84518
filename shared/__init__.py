"""Code imported by both the scheduler and the workers. Never imports torch."""
