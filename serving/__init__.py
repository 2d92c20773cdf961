"""KServe model server for the brain-MRI tumour classifier.

``python -m serving --model-name NAME --storage-uri s3://bucket/prefix`` (or KServe's
``--model_name``/``--storage_uri`` spelling) loads a model bundle (see :mod:`brainmri.model`) and
answers the KServe v1 and v2 inference protocols, with health, metadata and Prometheus
``/metrics`` on the same HTTP port. The predictor is :class:`serving.predictor.BrainMRIModel`;
reading requests, refusing bad ones and writing answers is :mod:`serving.protocol`; the
request-size limit :mod:`serving.limits`; the server as a child process :mod:`serving.process`.
"""
