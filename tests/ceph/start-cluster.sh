#!/usr/bin/env bash
# Start (or stop) a throwaway single-node Ceph cluster for trying the Ceph engine
# by hand; see tests/ceph/cluster.py for what it is. Prints the conf file path;
# the keys of client.admin and client.csi are in DIRECTORY/keys.json.
#   tests/ceph/start-cluster.sh DIRECTORY          start
#   tests/ceph/start-cluster.sh --stop DIRECTORY   stop it (its own daemons only)
set -euo pipefail
action=start
if [ "${1:-}" = "--stop" ]; then action=stop; shift; fi
directory=$(realpath -m "${1:?usage: $0 [--stop] DIRECTORY}")
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m tests.ceph.cluster "$action" "$directory"
