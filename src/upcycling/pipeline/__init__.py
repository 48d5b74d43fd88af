"""The job inventory the Snakefile reads: lineages, jobs, their arguments, and cleaning."""
