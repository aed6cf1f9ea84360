"""Trained query tower + retrieval index -> SavedModels in TF Serving's layout."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
