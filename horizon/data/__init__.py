"""Data: byte tokenizer, tensorstore token store, corpus building, step-indexed batches."""
