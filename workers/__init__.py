"""The consumer side: Celery tasks and the plain functions they call."""
