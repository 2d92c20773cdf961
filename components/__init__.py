"""Pipeline steps: each module holds a step's plain logic and its thin ``@dsl.component`` wrapper.

Every wrapper runs in one shared image (``components/Dockerfile``) that installs this package, so
wrappers import the logic instead of copying it. Override the image at compile time with
``COMPONENT_IMAGE``.
"""

import os

COMPONENT_IMAGE = os.environ.get("COMPONENT_IMAGE", "ghcr.io/brain-mri-mlops/components:0.1.0")
