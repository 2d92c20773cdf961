"""KServe model server for the brain-MRI tumour classifier.

``python -m serving --model-name NAME --storage-uri s3://bucket/prefix`` (or KServe's
``--model_name``/``--storage_uri`` spelling) loads a model bundle (see :mod:`brainmri.model`) and
answers the KServe v1 and v2 inference protocols, with health, metadata and Prometheus
``/metrics`` on the same HTTP port; the predictor itself is
:class:`serving.predictor.BrainMRIModel`, the request-size limit :mod:`serving.limits`.
"""
