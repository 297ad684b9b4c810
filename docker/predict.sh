#!/bin/sh
# /workspace/predict.sh in the image: what the organisers' `sh predict.sh` runs.
# Outputs are written 0644 whatever umask the engine hands over; the appliance's own
# predict.sh does the rest (exit 0 all written, 1 some case failed, 2 nothing could run).
umask 022
exec sh /opt/flare22/predict.sh "$@"
