"""Local stand-ins for the sandbox and the tests: AWS (moto) and MemoryDB (valkey behind TLS)."""
