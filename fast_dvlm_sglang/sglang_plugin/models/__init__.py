"""Scanned by SGLang's `ModelRegistry.register` (modules exposing `EntryClass`)."""
