"""Task judge: rank generated responses (LLM judge or reward model) into preference pairs and win rates."""
