"""Shared library of the brain-MRI workflow: settings, storage and locations, images, class
folders, backbones, the model bundle, the CPU budget, the Kubernetes API, records in the models
bucket, the local S3 server and the demo data. Nothing here imports ``components``,
``pipelines`` or ``serving``."""

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
