"""Task generate: sample K responses per prompt from the current policy into completion shards."""
