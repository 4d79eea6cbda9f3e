#!/bin/sh
# Start the API. A model baked in at build time (/opt/model/.baked) is used unless
# CATSDOGS_MODEL_URI says otherwise; without either, settings pull the registry's champion.
#
# The image binds 0.0.0.0, so `catsdogs serve` refuses to start without API keys unless
# CATSDOGS_ALLOW_ANONYMOUS=true. Keys come from CATSDOGS_API_KEYS or, kept out of `docker inspect`,
# from the file CATSDOGS_API_KEYS_FILE names (a Docker/Compose secret: one key per line or comma-separated).
# The prediction-id signing keys likewise: CATSDOGS_FEEDBACK_SECRETS or CATSDOGS_FEEDBACK_SECRETS_FILE.
set -eu
if [ -z "${CATSDOGS_MODEL_URI:-}" ] && [ -f /opt/model/.baked ]; then
  CATSDOGS_MODEL_URI=/opt/model
  export CATSDOGS_MODEL_URI
fi
if [ -z "${CATSDOGS_API_KEYS:-}" ] && [ -n "${CATSDOGS_API_KEYS_FILE:-}" ]; then
  CATSDOGS_API_KEYS=$(tr '\n' ',' < "$CATSDOGS_API_KEYS_FILE")
  export CATSDOGS_API_KEYS
fi
if [ -z "${CATSDOGS_FEEDBACK_SECRETS:-}" ] && [ -n "${CATSDOGS_FEEDBACK_SECRETS_FILE:-}" ]; then
  CATSDOGS_FEEDBACK_SECRETS=$(tr '\n' ',' < "$CATSDOGS_FEEDBACK_SECRETS_FILE")
  export CATSDOGS_FEEDBACK_SECRETS
fi
exec catsdogs serve "$@"
