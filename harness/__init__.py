"""Stand-ins and process helpers shared by tests/ and bench/: the Ollama emulator, llama-server, PostgreSQL.

Neither the product (not packaged) nor the tests: bench/ must not import tests/, and both use these.
"""
