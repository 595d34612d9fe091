#!/usr/bin/env bash
# Post-deploy script of every env here (Snakemake runs envs/<name>.post-deploy.sh,
# a link to this file, inside a new env right after creating it): installs this
# checkout of iteralign into the env, editable and without dependencies (the env
# file pins them). rules/common.smk sets ITERALIGN_SOURCE to the workflow folder.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation --editable \
    "${ITERALIGN_SOURCE:?is set by rules/common.smk when Snakemake reads the workflow}"
