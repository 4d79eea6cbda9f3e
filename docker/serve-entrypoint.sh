#!/bin/sh
# Start the API. A model baked in at build time (/opt/model/.baked) is used unless
# CATSDOGS_MODEL_URI says otherwise; without either, settings pull the registry's champion.
set -eu
if [ -z "${CATSDOGS_MODEL_URI:-}" ] && [ -f /opt/model/.baked ]; then
  CATSDOGS_MODEL_URI=/opt/model
  export CATSDOGS_MODEL_URI
fi
exec catsdogs serve "$@"
