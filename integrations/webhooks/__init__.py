"""A stand-in of core.sr.ht's webhook-delivery Celery worker (``srht/webhook/celery.py``).

``make_worker(broker, database_url=...)`` builds the Celery app the way core.sr.ht's
``make_worker`` does (POST the payload with a 5 s timeout, then UPDATE the delivery row; every
other exception is "mailed" and swallowed), with ``srht_readonly.celery.install`` so that a
read-only database fails a delivery in one log line instead of a mail and a traceback.
``integrations.webhooks.service`` builds one from the environment for ``celery -A``.
"""

from .worker import make_worker

__all__ = ["make_worker"]
