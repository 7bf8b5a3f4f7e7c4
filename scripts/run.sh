#!/usr/bin/env bash
# The main job: set up, then start the service locally (Ray workers + gRPC router), stream a
# few concurrent answers through gRPC, print them with their TTFT and tokens/s, and stop.
#   scripts/run.sh                                       # the default questions
#   scripts/run.sh "Write a haiku about GPUs" "Why?"     # your own prompts
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/tandem demo "$@"
