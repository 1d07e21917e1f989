"""The offline world of the demo zoo: the task suite, the evaluation harness, training (zoo, demo
models, tokenizer, QLoRA adapters) and the ALiBi experiment, with the shipped models as package
data (`models/`). Nothing in the serving runtime imports this package."""
