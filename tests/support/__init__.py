"""Test helpers the benchmark uses too: the Ollama emulator and child-process handling."""
