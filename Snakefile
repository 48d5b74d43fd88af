# The upcycling scaling-law pipeline. Stages and contracts: README.md and docs/.
# Every job comes from one inventory (src/upcycling/pipeline/jobs.py); the rules only name its patterns and
# call the package's CLI with the job's spec.
from snakemake.utils import min_version

min_version("9.0")


# A sweep given with --configfile replaces the default one whole (Snakemake would merge the two,
# leaking the default's model sizes and budgets into it). The default is found next to this file,
# whatever --directory the results go to; its relative corpus paths start here too.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/transform.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/results.smk"


rule all:
    default_target: True
    input:
        INVENTORY.targets(),
