"""The tokens stage: corpus readers, the tokenizer, tokenizing into shards, and the token windows training reads."""
