#!/usr/bin/env bash
# The command-line entry points.
set -e
slimfx passes
slimfx compress digits-mlp --pipeline "dead-code,fold-bn" --report-json /tmp/slimfx-report.json
slimfx explain digits-cnn --pipeline fold-bn
