"""Alembic migrations of the feedback store (run by :meth:`FeedbackStore.open`, never by hand)."""
