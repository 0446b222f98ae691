"""One module per chapter with its knobs (``chNN_slug.py``), registered into ``ftbook.config`` on import.

Why a module per chapter: each chapter's defaults and validators sit in one short file beside no other
chapter's, so chapters can be written (and reviewed) independently; ``ftbook.config`` keeps the
machinery — profiles, validation, ``make`` — in one place.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ch")):
    importlib.import_module(f"{__name__}.{_module}")
