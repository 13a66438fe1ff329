"""The baselines openkd is measured against: plain scripts doing the same work with the libraries
directly (vLLM's `LLM.chat`, an async OpenAI client, TRL's `SFTTrainer`, a bare Python loop).

Each runs as its own process, like openkd does, and writes its figures to a JSON file.
"""
