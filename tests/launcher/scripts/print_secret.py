"""Prints a digest of the launch secret this rank got (never the secret itself)."""
import hashlib
import os

print(f"rank {os.environ['RANK']} secret sha256 {hashlib.sha256(os.environ['DISTRIB_SECRET'].encode()).hexdigest()}")
