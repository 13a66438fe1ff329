"""`openkd decontaminate`: drop prompts that share word n-grams with benchmark problems."""
