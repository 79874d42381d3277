"""One model's inference: weights loader, model code, paged KV cache, batcher, sampler, tokenizer, and the
`Engine` the host drives step by step (`schedule() -> StepPlan`, `execute(plan)`, `collect(plan)`)."""
