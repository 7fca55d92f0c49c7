"""Token-level MoE: sparse upcycling of a dense HF causal LM, training, analysis, generation."""
