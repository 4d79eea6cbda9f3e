"""Monitoring after deployment: evaluation of a deployed service on labelled photos."""
