#!/bin/sh
# SDK container entry point on Dataflow workers: put the HMAC key into the environment, then start
# the Beam SDK harness with the arguments Dataflow passes (exec: boot keeps the container's PID 1).
#
# $FEEDBACK_HMAC_KEY_SECRET (baked into the image: a secret *name*) -> $FEEDBACK_HMAC_KEY, read with
# the worker service account (needs roles/secretmanager.secretAccessor). The key is never printed
# to the logs. If it cannot be read, the harness still starts and the job's DoFns fail in setup()
# with MissingKeyError, which names the missing variable in the job's error log.
if [ -z "${FEEDBACK_HMAC_KEY:-}" ] && [ -n "${FEEDBACK_HMAC_KEY_SECRET:-}" ]; then
  if key="$(python /template/templates/flex_launch.py --print-hmac-key)"; then
    FEEDBACK_HMAC_KEY="$key"
    export FEEDBACK_HMAC_KEY
  else
    echo "entrypoint: could not read the HMAC key from ${FEEDBACK_HMAC_KEY_SECRET}" >&2
  fi
  unset key
fi
exec /opt/apache/beam/boot "$@"
