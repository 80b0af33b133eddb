"""The only package of discovery that talks to AWS (through aiobotocore)."""
