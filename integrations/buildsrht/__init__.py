"""A stand-in of builds.sr.ht's worker: runs a job's shell steps and records them in the database.

Its database habits are builds.sr.ht's (``UPDATE job SET runner``, ``UPDATE job SET status,
updated``, ``UPDATE task SET status``, ``INSERT INTO artifact``), but every update goes through
``retry_until_writable`` with one ``Deadline`` for the whole build, as the plan asks: while the
database is read-only the build keeps running its steps and its updates wait, in order; past the
deadline the build is aborted with a clear status and log line. See ``docs/builds.md``.
"""

from .runner import BuildResult, BuildRunner

__all__ = ["BuildResult", "BuildRunner"]
