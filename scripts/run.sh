#!/usr/bin/env bash
# The main job: set up, then answer a chat prompt with the local engine, streaming the text.
#   scripts/run.sh                                  # asks the default question
#   scripts/run.sh "Write a haiku about GPUs"      # your own prompt
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
prompt=${1:-"What is the capital of France?"}
shift || true
exec .venv/bin/tandem generate --chat "$prompt" "$@"
