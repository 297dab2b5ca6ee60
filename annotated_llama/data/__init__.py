"""Data: token shards for pretraining, Alpaca records, instruction tasks and self-instruct."""
