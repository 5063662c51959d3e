"""git.sr.ht's SSH pipeline, written with srht-readonly, and what it takes to run it for real.

The programs, each started by ``python -m integrations.gitsrht.ssh PROGRAM`` (``__main__``):

* ``keys`` (sshd ``AuthorizedKeysCommand``): known key -> authorised; unknown key -> fetched
  from meta.sr.ht, used, and stored only while the database takes writes;
* ``shell`` (the key's forced command): resolves ``SSH_ORIGINAL_COMMAND``, auto-creates a missing
  repository in the pusher's own namespace (refused, with the reason, while read-only), then
  runs ``git receive-pack``/``upload-pack``;
* ``post-update`` (each repository's hook): reads what it needs, then drops the mtime update
  silently and the webhook deliveries with one warning while read-only.

``meta.MetaServer`` stands in for meta.sr.ht and ``sshd.GitSshd`` runs OpenSSH's sshd in front
of the pipeline on a loopback port. Nothing is imported here, so that the entry point stays
able to report a broken installation without a traceback.
"""
