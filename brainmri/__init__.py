"""Shared library of the brain-MRI workflow: storage, images, model, demo data."""

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
