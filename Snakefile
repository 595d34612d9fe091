# iteralign: online iterative preference alignment.
# Each round n: sample -> score -> feedback -> reference -> train -> evaluate.
#   snakemake --cores all                                     # the embedded CPU demo
#   snakemake --profile profiles/slurm --configfile my.yaml   # an experiment on a cluster
import sys

from snakemake.utils import min_version

min_version("9.0")


# config.yaml is the demo; a --configfile replaces it instead of being merged into it,
# so an experiment never inherits demo keys it did not set.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


# Parse-time helpers come from this checkout's package source (the rules run the
# installed `iteralign` command: make install).
sys.path.insert(0, f"{workflow.basedir}/src")
from iteralign.config import validate_workflow_config

# Validated once, against schemas/config.schema.yaml, defaults filled in; a bad key is
# one line naming it (Snakemake's validate() would print the whole schema).
config.update(validate_workflow_config(config, workflow.config_settings.configfiles))


report: "report/workflow.rst"


wildcard_constraints:
    n=r"\d+",


include: "rules/common.smk"
include: "rules/plan.smk"
include: "rules/sft.smk"
include: "rules/sample.smk"
include: "rules/score.smk"
include: "rules/feedback.smk"
include: "rules/reference.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/audit.smk"
include: "rules/retention.smk"
include: "rules/report.smk"
include: "rules/console.smk"


# One run per experiment, whatever folder it starts from; the last good version of every
# artefact kept before any job runs, and put back after a failed run (docs/workflow.md).
onstart:
    start_experiment_run()


onerror:
    recover_failed_run()


rule all:
    default_target: True
    input:
        final_targets(),
        pruned_checkpoints(),
