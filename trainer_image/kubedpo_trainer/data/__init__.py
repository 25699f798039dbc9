"""Preference data: shard readers and row formats, tokenization, collation, the resumable stream."""
