"""gradscope inside the trainers people use: ``gradscope.integrations.lightning`` (PyTorch Lightning)
and ``gradscope.integrations.transformers`` (the Hugging Face ``Trainer``). Each module imports its
trainer only when imported itself."""
