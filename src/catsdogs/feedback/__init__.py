"""The feedback store: labels sent to ``/feedback`` (and, where enabled, their images), shared by
every replica; read by the rollback guard and by ``catsdogs data ingest --feedback``."""
