"""Training: tokenizer training, token shards, the one training loop, checkpoints, evaluation, export."""
