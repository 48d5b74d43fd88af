"""The training stage: the loop, DeepSpeed checkpoints, the LR schedule, process groups."""
