"""The model stage: ModelConfig and FLOP counts, the transformer with its DeepSpeed-MoE layers, the Hugging Face export."""
