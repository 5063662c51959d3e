"""Put on ``PYTHONPATH`` by ``srht-readonly audit`` for the command it runs: SQLAlchemy's statements, with their frame.

When ``$SRHT_READONLY_AUDIT_RECORD`` names a file, every Python process of the command that
imports SQLAlchemy gets ``srht_readonly.audit.recorder.SqlAlchemyRecorder`` on its ``Engine``
class, appending to that file what its engines send to ``$SRHT_READONLY_AUDIT_ADDRESS`` (the
lab's PgBouncer, ``host:port``). Nothing is imported until SQLAlchemy is, and nothing here may
break the command: without srht_readonly in the process's environment it does nothing. The
``sitecustomize`` this one hides (Debian ships one) still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_RECORD = os.environ.get("SRHT_READONLY_AUDIT_RECORD")


def _install():
    try:
        from srht_readonly.audit.recorder import JsonLines, SqlAlchemyRecorder

        address = os.environ.get("SRHT_READONLY_AUDIT_ADDRESS")
        SqlAlchemyRecorder(JsonLines(_RECORD), addresses={address} if address else None).install()
    except Exception as exc:  # never break the audited command
        sys.stderr.write(f"srht-readonly audit: no SQLAlchemy hook in process {os.getpid()}: {exc}\n")


class _AfterSqlAlchemy:
    """A meta path finder that installs the hook once ``sqlalchemy`` has been imported."""

    busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "sqlalchemy" or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader, finder = spec.loader, self
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            _install()

        loader.exec_module = exec_module
        return spec


def _chain():
    """Run the ``sitecustomize`` further down ``sys.path`` that this module shadows."""
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", paths)
    if spec is None or spec.loader is None:
        return
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.stderr.write(f"srht-readonly audit: {spec.origin}: {exc}\n")


if _RECORD:
    if "sqlalchemy" in sys.modules:
        _install()
    else:
        sys.meta_path.insert(0, _AfterSqlAlchemy())
_chain()
