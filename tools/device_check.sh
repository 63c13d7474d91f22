#!/usr/bin/env bash
# One command on a GPU machine: compile every kernel natively, check it against its reference and
# benchmark it. Run from the repo root with no install step:  bash tools/device_check.sh [OUTDIR]
# Each section is tools/device/<op>.py; it prints a table and writes <OUTDIR>/<op>.json.
# SECTIONS="ssd qmatmul" picks sections; SECTION_TIMEOUT (seconds) bounds each one.
set -u
out=${1:-${OUT:-device_out}}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
sections=${SECTIONS:-$(ls tools/device/[a-z]*.py | xargs -n1 basename | sed 's/\.py$//')}
status=0
for name in $sections; do
  echo "=== $name"
  # Each section gets a hard limit so one hang cannot eat the whole lease.
  timeout "${SECTION_TIMEOUT:-150}" python3 -m "tools.device.$name" --out "$out/$name.json" || { echo "section $name failed ($?)"; status=1; }
done
exit $status
