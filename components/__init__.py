"""Pipeline steps. Each module holds one step's plain, typed logic (ingest, split, train,
evaluate, gate, promote, and what they share: config, augment, data_report, distributed,
train_job), which never imports KFP; ``kfp_components.py`` holds the thin ``@dsl.component``
wrappers that map KFP artifacts to paths and call it.

Every wrapper runs in one shared image (``components/Dockerfile``) that installs this package.
Override the image at compile time with ``COMPONENT_IMAGE``.
"""

import os

COMPONENT_IMAGE = os.environ.get("COMPONENT_IMAGE", "ghcr.io/brain-mri-mlops/components:0.1.0")
SERVING_IMAGE = "ghcr.io/brain-mri-mlops/predictor:0.1.0"  # the predictor (serving/Dockerfile)
