"""A stand-in of git.sr.ht: its schema, web front and SSH pipeline."""
