"""One router per concern: prediction, operations, feedback, admin, the upload page."""
