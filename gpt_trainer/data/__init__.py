"""Text to tokens to batches: corpora, tokenizers, the memory-mapped token cache, the batches of a step."""
