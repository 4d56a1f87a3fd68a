#!/usr/bin/env bash
# clsvd_tpu.py status: see tpu_scripts/README.md. Takes --dry-run to print the gcloud commands instead of running them.
exec python3 "$(dirname "$0")/clsvd_tpu.py" status "$@"
