# The six training rules, one definition (upcycling.pipeline.jobs.TRAINING_RULES): each family
# (dense; upcycled: the second stage from a dense export at D1; scratch: the same architecture
# from scratch, the guidance's baseline) has a stable rule (a WSD stable phase, continued from the
# previous stable point of its chain) and a final rule (its decay to D, or a whole cosine run,
# writing the run's metrics; a dense final also writes its Llama export). What differs between them
# lives in the job inventory: inputs, outputs, spec and resources.


for training_rule in TRAINING_RULES:

    rule:
        name:
            training_rule
        input:
            unpack(inputs_of(training_rule)),
        output:
            **outputs(training_rule),
        log:
            log_of(training_rule),
        conda:
            "../../envs/gpu.yml"
        threads: cpus_per_process(SWEEP)
        resources:
            **resources_of(training_rule),
        params:
            spec=spec_of(training_rule),
        shell:
            TRAIN
