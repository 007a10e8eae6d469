#!/bin/sh
# The floor: N parallel `curl` fetches of the series zips plus `unzip -q`, no Python.
# Usage: floor.sh API_V1_URL OUT_DIR N < uids   (API_V1_URL ends in .../services/v1/)
# Each series: curl writes <uid>.zip, unzip extracts it to <uid>/, the zip is removed.
# Exit status: 0 when every series worked (xargs says 123 when one failed).
set -eu
base=$1
out=$2
n=$3
mkdir -p "$out"
export base out
exec xargs -P "$n" -n 1 sh -c \
  'curl -sf -o "$out/$0.zip" "${base}getImage?SeriesInstanceUID=$0" &&
   unzip -q -o "$out/$0.zip" -d "$out/$0" && rm -f "$out/$0.zip"'
